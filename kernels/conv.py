"""Implicit-GEMM conv2d with the ConvBlock epilogue fused (inference only).

out = act(conv(x, weight) * scale + shift [+ residual]), where scale/shift are BatchNorm in eval
mode folded per output channel (scale = gamma / sqrt(var + eps), shift = beta - mean * scale).
GEMM view: M = B*Ho*Wo output pixels, N = C_out, K = k*k*C_in, walked tap by tap and channel
block by channel block, so the im2col matrix never exists; the epilogue runs on the fp32
accumulator before the single store.

Contract: x (B, C_in, H, W), weight (C_out, C_in, k, k) with k in {1, 3}, padding k // 2,
stride 1 or 2, groups 1, no bias; any B, H, W and channel counts (masked). fp16, bf16, fp32;
it computes in x's dtype, or autocast's when autocast is on, casting the weight to it (scale,
shift and residual may be any float dtype). fp32 dots are TF32 (10-bit mantissa inputs, errors
near fp16's) only if ``torch.backends.cudnn.allow_tf32``, as cuDNN would, else IEEE fp32 (FMA
loops, on smaller tiles). x and weight are made channels_last (free if they already are) and
the output is channels_last, so a chain of these convs stays NHWC. No backward: when autograd
needs one, the PyTorch path runs. NVIDIA compile needs tl.dot blocks >= 16 (all configs are)
and power-of-two blocks.
"""

import torch
import torch.nn.functional as F

from . import onednn
from .backend import (
    Launch,
    compute_dtype,
    dispatch,
    dot_precision,
    kernel,
    tensor_limit,
    tl,
    triton,
)


def conv_bn_act_reference(x, weight, scale, shift, stride=1, residual=None, relu=True):
    """Conv + folded BatchNorm + residual + ReLU in PyTorch: F.conv2d in x's dtype (autocast's
    when on), per-channel affine, residual add, ReLU.

    Arguments as :func:`conv_bn_act` (which has ``backend`` besides).
    """
    y = F.conv2d(x, weight.to(x.dtype), stride=stride, padding=weight.shape[-1] // 2)
    y = y * scale.to(y.dtype)[:, None, None] + shift.to(y.dtype)[:, None, None]
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


@kernel(key=['M', 'C_IN', 'C_OUT', 'KSIZE', 'STRIDE', 'PRECISION'],
        interpret=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), configs=[
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
        ], ieee_configs=[
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
            dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
        ])
def _conv_bn_act_kernel(X, W, SCALE, SHIFT, RES, OUT, M, H, W_IN, C_IN, H_OUT, W_OUT, C_OUT,
                        x_stride_batch, x_stride_channel, x_stride_row, x_stride_col,
                        w_stride_out, w_stride_in, w_stride_row, w_stride_col,
                        res_stride_batch, res_stride_channel, res_stride_row, res_stride_col,
                        out_stride_batch, out_stride_channel, out_stride_row, out_stride_col,
                        KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_RES: tl.constexpr,
                        RELU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M pixels x BLOCK_N channels) output tile. A 1-D grid puts the channel blocks
    of a pixel block next to each other, so they share its x tiles in L2."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(C_OUT, BLOCK_N)
    pid_m, pid_n = pid // n_blocks, pid % n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < C_OUT
    b = (offs_m // (H_OUT * W_OUT)).to(tl.int64)  # batch offsets of large inputs pass 2**31
    ho = offs_m % (H_OUT * W_OUT) // W_OUT
    wo = offs_m % W_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kh in tl.static_range(KSIZE):
        hi = ho * STRIDE + kh - KSIZE // 2
        for kw in tl.static_range(KSIZE):
            wi = wo * STRIDE + kw - KSIZE // 2
            pix_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W_IN)  # zero padding
            x_ptrs = X + b * x_stride_batch + hi * x_stride_row + wi * x_stride_col
            w_ptrs = W + offs_n * w_stride_out + kh * w_stride_row + kw * w_stride_col
            for c in range(0, C_IN, BLOCK_K):
                cs = c + offs_k
                c_ok = cs < C_IN
                a = tl.load(x_ptrs[:, None] + cs[None, :] * x_stride_channel,
                            mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                w = tl.load(w_ptrs[None, :] + cs[:, None] * w_stride_in,
                            mask=c_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
    scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * scale[None, :] + shift[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        res_pixels = b * res_stride_batch + ho * res_stride_row + wo * res_stride_col
        res_ptrs = RES + res_pixels[:, None] + offs_n[None, :] * res_stride_channel
        y += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    out_pixels = b * out_stride_batch + ho * out_stride_row + wo * out_stride_col
    out_ptrs = OUT + out_pixels[:, None] + offs_n[None, :] * out_stride_channel
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=mask)


def _limit(x, weight, stride, residual):
    if x.dim() != 4 or weight.dim() != 4:
        return f'x and weight must be 4-D (got {x.dim()}-D and {weight.dim()}-D)'
    if weight.shape[2] != weight.shape[3] or weight.shape[2] not in (1, 3):
        return f'the kernel must be 1x1 or 3x3 (got {weight.shape[2]}x{weight.shape[3]})'
    if weight.shape[1] != x.shape[1]:
        return (f'groups must be 1: weight takes {weight.shape[1]} input channels, '
                f'x has {x.shape[1]}')
    if stride not in (1, 2):
        return f'stride must be 1 or 2 (got {stride})'
    return tensor_limit(x) or tensor_limit(weight) or tensor_limit(residual)


def _output(x, weight, stride, residual=None):
    """The channels_last output of the conv of ``x`` (padding k // 2, k odd), in the dtype the
    reference returns: x's, promoted by the residual's (as under autocast, when they differ)."""
    B, _, H, W = x.shape
    H_out, W_out = (H - 1) // stride + 1, (W - 1) // stride + 1
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return torch.empty(B, weight.shape[0], H_out, W_out, device=x.device, dtype=dtype,
                       memory_format=torch.channels_last)


def conv_launch(x, weight, scale, shift, out, stride, residual, relu, precision):
    """The kernel's :class:`Launch` writing ``out``; ``precision`` as from ``dot_precision``."""
    B, C_in, H, W = x.shape
    _, C_out, H_out, W_out = out.shape
    res = out if residual is None else residual  # any strides; a dummy pointer when absent
    M = B * H_out * W_out

    def grid(meta):
        return (triton.cdiv(M, meta['BLOCK_M']) * triton.cdiv(C_out, meta['BLOCK_N']),)

    args = (x, weight, scale, shift, res, out, M, H, W, C_in, H_out, W_out, C_out,
            *x.stride(), *weight.stride(), *res.stride(), *out.stride())
    return Launch(_conv_bn_act_kernel, grid, args,
                  dict(KSIZE=weight.shape[-1], STRIDE=stride, HAS_RES=residual is not None,
                       RELU=relu, PRECISION=precision))


def _conv_bn_act_triton(x, weight, scale, shift, stride, residual, relu):
    dtype = compute_dtype(x)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    out = _output(x, weight, stride, residual)
    precision = dot_precision(x.dtype, torch.backends.cudnn.allow_tf32)
    conv_launch(x, weight, scale, shift, out, stride, residual, relu, precision).run()
    return out


def conv_bn_act(x, weight, scale, shift, stride=1, residual=None, relu=True, backend=None):
    """ReLU?(conv2d(x, weight, stride, padding=k//2) * scale + shift + residual?), NCHW in and out.

    The Triton and oneDNN paths (:mod:`.onednn`, any odd k) are inference-only: when autograd
    needs gradients the PyTorch path runs, whatever the backend. Their output is channels_last
    (still NCHW-shaped).

    Args:
        x: input (B, C_in, H, W).
        weight: conv weight (C_out, C_in, k, k), k in {1, 3}; no bias.
        scale: (C_out,) per-channel multiplier from the folded BatchNorm.
        shift: (C_out,) per-channel offset from the folded BatchNorm.
        stride: conv stride (1 or 2 on the Triton path); padding is k // 2.
        residual: (B, C_out, Ho, Wo) added before the ReLU, or None.
        relu: apply ReLU to the result.
        backend: overrides the default backend (see :mod:`conformer.kernels.backend`).
    """
    route = dispatch('conv_bn_act', backend, (x, weight, scale, shift, residual),
                     triton_limit=lambda: _limit(x, weight, stride, residual),
                     onednn_limit=lambda: onednn.conv_limit(x, weight))
    if route == 'triton':
        return _conv_bn_act_triton(x, weight, scale, shift, stride, residual, relu)
    if route == 'onednn':
        return onednn.conv_bn_act(x, weight, scale, shift, stride, residual, relu)
    return conv_bn_act_reference(x, weight, scale, shift, stride, residual, relu)
