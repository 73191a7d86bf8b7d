"""Conformer building blocks.

Parameter names, layer order and every epsilon follow the paper's reference code, so its
state_dicts load unchanged and produce the same outputs. Two generalisations let any input
size work: the CNN map is pooled onto the transformer's token grid with adaptive average
pooling, and the token map is upsampled back to the CNN map's exact size. Both reduce to the
paper's fixed-stride AvgPool / nearest upsample when the sizes divide evenly.

The layers compute through the ops of `conformer.kernels`, which pick PyTorch, Triton or
oneDNN for each call ('auto' | 'triton' | 'torch' | 'onednn'); `kernel_backend` on a layer
overrides the process default (`Conformer.set_kernel_backend` sets it model-wide). A
BatchNorm reaches the ops as the affine it is in eval mode; while it normalises with batch
statistics (training) the layer runs its modules, as the paper's code does.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from conformer.kernels import attention, conv_bn_act, fcu_down, fcu_up, linear
from conformer.kernels.fcu import fcu_down_reference
from conformer.kernels.flash_attention import attention_reference
from conformer.kernels.linear import linear_reference

# the ops pick an implementation from concrete tensors: leaves for FX tracing
torch.fx.wrap('attention')
torch.fx.wrap('conv_bn_relu')
torch.fx.wrap('fcu_down')
torch.fx.wrap('fcu_up_bn')
torch.fx.wrap('linear')

BatchNorm2dEps6 = partial(nn.BatchNorm2d, eps=1e-6)
LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class KernelLayer(nn.Module):
    """A layer whose forward calls `conformer.kernels` ops; `kernel_backend` None follows the
    kernels' default.

    The ops are Python, which TorchScript cannot compile: scripted code takes the branch after
    an `if not torch.jit.is_scripting():` of its own (TorchScript skips only such branches),
    which calls the ops' PyTorch references.
    """
    kernel_backend: Optional[str] = None

    def linear_op(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  gelu: bool = False) -> torch.Tensor:
        """`conformer.kernels.linear` (same arguments) with this layer's backend."""
        if not torch.jit.is_scripting():
            return linear(x, weight, bias, gelu, backend=self.kernel_backend)
        return linear_reference(x, weight, bias, gelu)


def bn_affine(conv: nn.Conv2d, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) equal to eval-mode BN after `conv` (BN may already be folded
    into the conv's bias, as the deploy path does).

    Args:
        conv: the conv before the BN; its bias, if any, goes into the shift.
        bn: a BatchNorm2d, or anything else (an identity) if BN is already folded into `conv`.
    """
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return scale, shift
    shift = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return torch.ones_like(shift), shift


# The two functions below take a BatchNorm module: in eval mode it reaches the op as the affine
# it is; while it normalises with batch statistics (training) it runs as a module, since no
# kernel computes them. As FX leaves they get the live modules, so traced graphs follow
# train() / eval().

def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool,
                 residual: Optional[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    """ReLU?(bn(conv(x)) [+ residual]) by `conformer.kernels.conv_bn_act`.

    Args:
        x: input map (B, C_in, H, W).
        conv: the conv module (its weight and stride are used; padding is k // 2).
        bn: the BatchNorm after it, or an identity when folded into the conv's bias.
        relu: apply ReLU to the result.
        residual: map added before the ReLU, or None.
        backend: kernel backend; None follows the kernels' default.
    """
    if bn.training:
        y = bn(conv(x))
        y = y if residual is None else y + residual
        return F.relu(y, inplace=True) if relu else y
    return conv_bn_act(x, conv.weight, *bn_affine(conv, bn), stride=conv.stride[0],
                       residual=residual, relu=relu, backend=backend)


def fcu_up_bn(tokens: torch.Tensor, grid: Tuple[int, int], conv: nn.Conv2d, bn: nn.Module,
              add_to: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    """`add_to` + nearest-resized ReLU(bn(conv(token map))) by `conformer.kernels.fcu_up`.

    Args:
        tokens: (B, Hg*Wg, C_in), without the class token.
        grid: (Hg, Wg), the token grid.
        conv: the 1x1 conv module.
        bn: the BatchNorm after it, or an identity when folded into the conv's bias.
        add_to: (B, C_out, H, W) map the result is added to (not modified).
        backend: kernel backend; None follows the kernels' default.
    """
    out_hw = (add_to.shape[2], add_to.shape[3])
    if bn.training:
        x = tokens.transpose(1, 2).unflatten(2, grid)
        return add_to + F.interpolate(F.relu(bn(conv(x))), size=out_hw, mode='nearest')
    scale, shift = bn_affine(conv, bn)  # the conv bias is in the shift
    return fcu_up(tokens, grid, conv.weight, torch.zeros_like(shift), scale, shift, out_hw,
                  add_to, backend=backend)


class Attention(KernelLayer):
    """Multi-head self-attention with a fused qkv projection (the ViT/DeiT layout).

    Args:
        dim: token width; a multiple of `num_heads`.
        num_heads: attention heads.
        qkv_bias: give the qkv projection a bias.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

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
        qkv = self.linear_op(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.
        if not torch.jit.is_scripting():
            x = attention(q, k, v, scale=self.scale, dropout_p=dropout_p,
                          backend=self.kernel_backend)
        else:
            x = attention_reference(q, k, v, self.scale, dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.linear_op(x, self.proj.weight, self.proj.bias))


class Mlp(KernelLayer):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout, with timm's Mlp parameter names; fc1
    and its GELU are one op call.

    Args:
        dim: input and output width.
        hidden_dim: width between the two linears.
        drop: dropout after each linear.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.linear_op(x, self.fc1.weight, self.fc1.bias, gelu=True))
        return self.drop2(self.linear_op(x, self.fc2.weight, self.fc2.bias))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block; one DropPath serves both residual branches, as in the paper.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over `dim`.
        qkv_bias: give the qkv projection a bias.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth rate of both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.norm1 = LayerNormEps6(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNormEps6(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvBlock(KernelLayer):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4); no drop path, as in the paper.

    Split in two so a coupling unit can add into the 3x3 conv's input: `reduce` is the first
    1x1 conv, `expand` the rest; `forward(x, fusion)` runs both with `fusion` added between.
    `expand` returns the block output and the 3x3 conv's activation (the FCU down-path input).

    Args:
        in_chs: input channels.
        out_chs: output channels (4x the bottleneck width).
        stride: stride of the 3x3 conv and of the residual projection.
        res_conv: project the shortcut with a 1x1 conv + BN (needed when the shape changes).
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

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The first 1x1 conv, BN and ReLU.

        Args:
            x: the block input (B, in_chs, H, W).
        """
        if not torch.jit.is_scripting():
            return conv_bn_relu(x, self.conv1, self.bn1, True, None, self.kernel_backend)
        return self.act1(self.bn1(self.conv1(x)))

    def expand(self, h: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rest of the block after `reduce`.

        Args:
            h: output of `reduce`, with any fusion already added.
            x: the block input, for the shortcut.

        Returns:
            (block output, the 3x3 conv's activation).
        """
        if not torch.jit.is_scripting():
            backend = self.kernel_backend
            shortcut = x
            if isinstance(self.residual_conv, nn.Conv2d):
                shortcut = conv_bn_relu(x, self.residual_conv, self.residual_bn, False, None,
                                        backend)
            x2 = conv_bn_relu(h, self.conv2, self.bn2, True, None, backend)
            return conv_bn_relu(x2, self.conv3, self.bn3, True, shortcut, backend), x2
        shortcut = self.residual_bn(self.residual_conv(x))
        x2 = self.act2(self.bn2(self.conv2(h)))
        return self.act3(self.bn3(self.conv3(x2)) + shortcut), x2

    def forward(self, x: torch.Tensor,
                fusion: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.reduce(x)
        if fusion is not None:
            h = h + fusion
        return self.expand(h, x)


class FCUDown(KernelLayer):
    """CNN feature map -> patch tokens: average pool onto the token grid, 1x1 conv, LN, GELU
    (`conformer.kernels.fcu_down`).

    The class token of the incoming token sequence is prepended unchanged. Pooling and a 1x1
    conv are both linear, so pooling first is the same function as the paper's conv-then-pool,
    with a conv over (grid / map)^2 of the pixels (16x fewer in the first stage at 224 px).

    Args:
        in_chs: CNN channels.
        embed_dim: token width.
    """

    def __init__(self, in_chs: int, embed_dim: int):
        super().__init__()
        self.conv_project = nn.Conv2d(in_chs, embed_dim, 1)
        self.ln = LayerNormEps6(embed_dim)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        bias = self.conv_project.bias
        assert bias is not None  # built with one; TorchScript needs to be told
        args = (x, self.conv_project.weight, bias, grid, self.ln.weight, self.ln.bias,
                self.ln.eps)
        if not torch.jit.is_scripting():
            tokens = fcu_down(*args, backend=self.kernel_backend)
        else:
            tokens = fcu_down_reference(*args)
        return torch.cat([x_t[:, :1], tokens], dim=1)


class FCUUp(KernelLayer):
    """Patch tokens -> CNN feature map added into `add_to`: drop the class token, 1x1 conv,
    BN, ReLU, nearest resize to `add_to`'s size (`conformer.kernels.fcu_up`).

    Args:
        embed_dim: token width.
        out_chs: CNN channels of the map the result is added to.
    """

    def __init__(self, embed_dim: int, out_chs: int):
        super().__init__()
        self.conv_project = nn.Conv2d(embed_dim, out_chs, 1)
        self.bn = BatchNorm2dEps6(out_chs)
        self.act = nn.ReLU()

    def forward(self, x_t: torch.Tensor, grid: Tuple[int, int],
                add_to: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return fcu_up_bn(x_t[:, 1:], grid, self.conv_project, self.bn, add_to,
                             self.kernel_backend)
        B, _, C = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(B, C, grid[0], grid[1])
        x = self.act(self.bn(self.conv_project(x)))
        return add_to + F.interpolate(x, size=(add_to.shape[2], add_to.shape[3]), mode='nearest')
