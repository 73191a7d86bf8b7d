"""Conformer building blocks.

Parameter names, layer order and every epsilon follow the paper's reference code, so its
state_dicts load unchanged and produce the same outputs. Two generalisations let any input
size work: the CNN map is pooled onto the transformer's token grid with adaptive average
pooling, and the token map is upsampled back to the CNN map's exact size. Both reduce to the
paper's fixed-stride AvgPool / nearest upsample when the sizes divide evenly.

Every hot op goes through `conformer.kernels`, whose backend switch ('auto' | 'triton' |
'torch') picks Triton or PyTorch; `kernel_backend` on a layer overrides the process default
(`Conformer.set_kernel_backend` sets it model-wide). The conv + BatchNorm kernels are
inference-only, so in train mode, and whenever the switch picks PyTorch, the layers run their
own modules exactly as the paper's code does.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.fx
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp

from conformer.kernels import attention, conv_bn_act, fcu_down, fcu_up, prefers_triton

torch.fx.wrap('attention')  # dispatches on concrete tensors: a leaf for FX tracing

BatchNorm2dEps6 = partial(nn.BatchNorm2d, eps=1e-6)
LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)


class KernelLayer(nn.Module):
    """A layer whose forward calls `conformer.kernels`; None follows the kernels' default.

    Callers test `torch.jit.is_scripting()` in an `if` of its own before calling
    `fused_route`: TorchScript skips only such branches, and the kernels are Python.
    """
    kernel_backend: Optional[str] = None

    def fused_route(self, x: torch.Tensor, inference_only: bool = True) -> bool:
        """Whether to run the fused kernels. Those that fold BatchNorm are `inference_only`;
        FX graphs keep the module ops, so a traced graph stays device-agnostic."""
        if is_fx_symbolic_tracing() or (inference_only and self.training):
            return False
        return prefers_triton(self.kernel_backend, x)


def bn_affine(conv: nn.Conv2d, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) equal to eval-mode BN after `conv` (BN may already be folded
    into the conv's bias, as the deploy path does)."""
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return scale, shift
    shift = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return torch.ones_like(shift), shift


class Attention(KernelLayer):
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
        dropout_p = self.attn_drop if self.training else 0.
        if torch.jit.is_scripting():
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        else:
            x = attention(q, k, v, scale=self.scale, dropout_p=dropout_p,
                          backend=self.kernel_backend)
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


class ConvBlock(KernelLayer):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, expansion 4); no drop path, as in the paper.

    Split in two so a coupling unit can add into the 3x3 conv's input: `reduce` is the first
    1x1 conv, `expand` the rest; `forward(x, fusion)` runs both with `fusion` added between.
    `expand` returns the block output and the 3x3 conv's activation (the FCU down-path input).
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
        if not torch.jit.is_scripting():
            if self.fused_route(x):
                return conv_bn_act(x, self.conv1.weight, *bn_affine(self.conv1, self.bn1),
                                   backend=self.kernel_backend)
        return self.act1(self.bn1(self.conv1(x)))

    def expand(self, h: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_scripting():
            if self.fused_route(x):
                return self._expand_fused(h, x)
        shortcut = self.residual_bn(self.residual_conv(x))
        x2 = self.act2(self.bn2(self.conv2(h)))
        return self.project(x2, shortcut), x2

    def project(self, x2: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """The last 1x1 conv, BN, residual add and ReLU; the CPU deploy path makes it one call."""
        return self.act3(self.bn3(self.conv3(x2)) + shortcut)

    @torch.jit.unused
    def _expand_fused(self, h: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        backend = self.kernel_backend
        shortcut = x
        if isinstance(self.residual_conv, nn.Conv2d):
            shortcut = conv_bn_act(
                x, self.residual_conv.weight, *bn_affine(self.residual_conv, self.residual_bn),
                stride=self.residual_conv.stride[0], relu=False, backend=backend)
        x2 = conv_bn_act(h, self.conv2.weight, *bn_affine(self.conv2, self.bn2),
                         stride=self.conv2.stride[0], backend=backend)
        out = conv_bn_act(x2, self.conv3.weight, *bn_affine(self.conv3, self.bn3),
                          residual=shortcut, backend=backend)
        return out, x2

    def forward(self, x: torch.Tensor,
                fusion: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.reduce(x)
        if fusion is not None:
            h = h + fusion
        return self.expand(h, x)


class FCUDown(KernelLayer):
    """CNN feature map -> patch tokens: 1x1 conv, average pool onto the token grid, LN, GELU.

    The class token of the incoming token sequence is prepended unchanged. Pooling and a 1x1
    conv are both linear, so this pools first: the same function as the paper's conv-then-pool,
    with a conv over (grid / map)^2 of the pixels (16x fewer in the first stage at 224 px).
    """

    def __init__(self, in_chs: int, embed_dim: int):
        super().__init__()
        self.conv_project = nn.Conv2d(in_chs, embed_dim, 1)
        self.ln = LayerNormEps6(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.fused_route(x, inference_only=False):  # it backs off itself for autograd
                tokens = fcu_down(x, self.conv_project.weight, self.conv_project.bias, grid,
                                  self.ln.weight, self.ln.bias, self.ln.eps,
                                  backend=self.kernel_backend)
                return torch.cat([x_t[:, :1], tokens], dim=1)
        x = self.conv_project(F.adaptive_avg_pool2d(x, grid))
        x = self.act(self.ln(x.flatten(2).transpose(1, 2)))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(KernelLayer):
    """Patch tokens -> CNN feature map added into `add_to`: drop the class token, 1x1 conv,
    BN, ReLU, nearest resize to `add_to`'s size."""

    def __init__(self, embed_dim: int, out_chs: int):
        super().__init__()
        self.conv_project = nn.Conv2d(embed_dim, out_chs, 1)
        self.bn = BatchNorm2dEps6(out_chs)
        self.act = nn.ReLU()

    def forward(self, x_t: torch.Tensor, grid: Tuple[int, int],
                add_to: torch.Tensor) -> torch.Tensor:
        out_hw = (add_to.shape[2], add_to.shape[3])
        if not torch.jit.is_scripting():
            if self.fused_route(x_t):
                return fcu_up(x_t[:, 1:], grid, self.conv_project.weight, *self._affine_args(),
                              out_hw, add_to, backend=self.kernel_backend)
        B, _, C = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(B, C, grid[0], grid[1])
        x = self.act(self.bn(self.conv_project(x)))
        return add_to + F.interpolate(x, size=out_hw, mode='nearest')

    @torch.jit.unused
    def _affine_args(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias, scale, shift) for the kernel: the conv bias is applied before BN there."""
        scale, shift = bn_affine(self.conv_project, self.bn)
        return torch.zeros_like(shift), scale, shift
