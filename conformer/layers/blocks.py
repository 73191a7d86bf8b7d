"""Conformer building blocks.

Parameter names, layer order and every epsilon follow the paper's reference code, so its
state_dicts load unchanged and produce the same outputs. Two generalisations let any input
size work: the CNN map is pooled onto the transformer's token grid with adaptive average
pooling, and the token map is upsampled back to the CNN map's exact size. Both reduce to the
paper's fixed-stride AvgPool / nearest upsample when the sizes divide evenly.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp

BatchNorm2dEps6 = partial(nn.BatchNorm2d, eps=1e-6)
LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (the ViT/DeiT layout)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}; '
                             f'pick num_heads that divides embed_dim.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block; one DropPath serves both residual branches, as in the paper."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = LayerNormEps6(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNormEps6(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4); no drop path, as in the paper.

    `fusion` (the up-projected transformer features) is added to the input of the 3x3 conv.
    Returns the block output and the 3x3 conv's activation, which feeds the FCU down-path.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, res_conv: bool = False):
        super().__init__()
        mid_chs = out_chs // 4
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = BatchNorm2dEps6(mid_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2dEps6(mid_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = BatchNorm2dEps6(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        if res_conv:
            self.residual_conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
            self.residual_bn = BatchNorm2dEps6(out_chs)
        else:
            self.residual_conv = nn.Identity()
            self.residual_bn = nn.Identity()

    def forward(self, x: torch.Tensor,
                fusion: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        shortcut = self.residual_bn(self.residual_conv(x))
        x = self.act1(self.bn1(self.conv1(x)))
        if fusion is not None:
            x = x + fusion
        x2 = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x2))
        return self.act3(x + shortcut), x2


class FCUDown(nn.Module):
    """CNN feature map -> patch tokens: 1x1 conv, average pool onto the token grid, LN, GELU.

    The class token of the incoming token sequence is prepended unchanged.
    """

    def __init__(self, in_chs: int, embed_dim: int):
        super().__init__()
        self.conv_project = nn.Conv2d(in_chs, embed_dim, 1)
        self.ln = LayerNormEps6(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.conv_project(x), grid)
        x = self.act(self.ln(x.flatten(2).transpose(1, 2)))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(nn.Module):
    """Patch tokens -> CNN feature map: drop the class token, 1x1 conv, BN, ReLU, nearest resize."""

    def __init__(self, embed_dim: int, out_chs: int):
        super().__init__()
        self.conv_project = nn.Conv2d(embed_dim, out_chs, 1)
        self.bn = BatchNorm2dEps6(out_chs)
        self.act = nn.ReLU()

    def forward(self, x_t: torch.Tensor, grid: Tuple[int, int],
                out_hw: Tuple[int, int]) -> torch.Tensor:
        B, _, C = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(B, C, grid[0], grid[1])
        x = self.act(self.bn(self.conv_project(x)))
        return F.interpolate(x, size=out_hw, mode='nearest')
