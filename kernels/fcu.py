"""Conformer's feature-coupling units, each one kernel (inference only).

FCU-down (CNN map -> tokens): average pool to the token grid -> 1x1 conv (bias) -> LayerNorm ->
GELU (erf); the paper convolves before pooling, the same function (both are linear) with dw*dw
times the GEMM work. A program owns whole token rows, as two power-of-two blocks (384 = 256 +
128, 576 = 512 + 64: no padding), so the LayerNorm and GELU run on the accumulators before the
only store.
FCU-up (tokens -> CNN map): 1x1 conv (bias) -> BatchNorm (folded) -> ReLU -> nearest upsample ->
add to a feature map. A program computes a tile of tokens once and writes it, added to
``add_to``, to every pixel of the tokens' windows; the upsampled map never exists.

Both kernels need the map size to be a multiple of the token grid; other sizes (adaptive pooling,
uneven nearest upsampling) run in PyTorch under 'auto'. fp16, bf16, fp32; each computes in its
input's dtype, or autocast's when autocast is on, casting the conv weight to it, and returns
what its reference returns (FCU-down's tokens are fp32 under CUDA autocast, whose LayerNorm runs
in fp32). fp32 dots are TF32 (10-bit mantissa inputs, errors near fp16's) only if
``torch.backends.cuda.matmul.allow_tf32``, else IEEE fp32 (on smaller tiles). No backward: when
autograd needs one, the PyTorch path runs. NVIDIA compile needs tl.dot blocks >= 16 (all are)
and power-of-two blocks; FCU-down takes at most 1024 output channels (a row in registers).
"""

from typing import Tuple

import torch
import torch.nn.functional as F

from .backend import (
    Launch,
    compute_dtype,
    dispatch,
    dot_precision,
    jit,
    kernel,
    next_pow2,
    tensor_limit,
    tl,
    triton,
)


def fcu_down_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       grid_hw: Tuple[int, int], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                       ln_eps: float) -> torch.Tensor:
    """FCU-down in PyTorch: average pool to ``grid_hw`` (adaptively when the map is not a
    multiple of it), 1x1 conv, LayerNorm, GELU. The paper's code convolves before pooling; both
    are linear and the pool's weights sum to one, so pooling first is the same function with
    (grid / map)^2 of the conv's work.

    Arguments as :func:`fcu_down` (which has ``backend`` besides).
    """
    x = F.conv2d(F.adaptive_avg_pool2d(x, grid_hw), weight.to(x.dtype), bias.to(x.dtype))
    x = F.layer_norm(x.flatten(2).transpose(1, 2), x.shape[1:2], ln_weight, ln_bias, ln_eps)
    return F.gelu(x)


def fcu_up_reference(tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to):
    """FCU-up in PyTorch: tokens to a map, 1x1 conv in the tokens' dtype (autocast's when on),
    affine, ReLU, nearest upsample, add.

    Arguments as :func:`fcu_up` (which has ``backend`` besides).
    """
    x = tokens.transpose(1, 2).unflatten(2, grid_hw)
    x = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))
    x = F.relu(x * bn_scale.to(x.dtype)[:, None, None] + bn_shift.to(x.dtype)[:, None, None])
    return add_to + F.interpolate(x, size=out_hw, mode='nearest')


@jit
def _ln_gelu_store(OUT, rows, rows_ok, cols, centred, rstd, LN_W, LN_B, C_OUT):
    """Scale and shift ``centred`` (rows x cols of a token row, mean already subtracted) by
    ``rstd`` and the LayerNorm affine, apply exact GELU and store the real channels."""
    cols_ok = cols < C_OUT
    ln_w = tl.load(LN_W + cols, mask=cols_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(LN_B + cols, mask=cols_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    tl.store(OUT + rows.to(tl.int64)[:, None] * C_OUT + cols[None, :],
             y.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@kernel(key=['C_IN', 'C_OUT', 'PH', 'PW', 'PRECISION'], interpret=dict(BLOCK_M=32, BLOCK_K=16),
        configs=[  # 64 x 384 accumulators fit in registers; 64 x 576 spill a little, 32 x 576 not
            dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=2),
            dict(BLOCK_M=64, BLOCK_K=16, num_warps=8, num_stages=3),
            dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=2),
        ], ieee_configs=[
            dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=2),
            dict(BLOCK_M=32, BLOCK_K=16, num_warps=8, num_stages=2),
        ])
def _fcu_down_kernel(X, W, BIAS, LN_W, LN_B, OUT, M, L, GW, C_IN, C_OUT, PH, PW, eps,
                     x_stride_batch, x_stride_channel, x_stride_row, x_stride_col,
                     w_stride_out, w_stride_in,
                     HEAD_N: tl.constexpr, TAIL_N: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_M tokens x all C_out channels, so LayerNorm sees whole rows. The row is two
    power-of-two blocks, HEAD_N + TAIL_N (384 = 256 + 128, 576 = 512 + 64), so a row that is
    not a power of two is not padded to the next one."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # token index over B * L
    head = tl.arange(0, HEAD_N)
    tail = HEAD_N + tl.arange(0, TAIL_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, head_ok, tail_ok = offs_m < M, head < C_OUT, tail < C_OUT
    b = (offs_m // L).to(tl.int64)  # batch offsets of large inputs pass 2**31
    gy, gx = offs_m % L // GW, offs_m % GW
    # top-left pixel of each token's window
    x_ptrs = X + b * x_stride_batch + gy * PH * x_stride_row + gx * PW * x_stride_col
    acc_head = tl.zeros([BLOCK_M, HEAD_N], tl.float32)
    acc_tail = tl.zeros([BLOCK_M, TAIL_N], tl.float32)
    for c in range(0, C_IN, BLOCK_K):
        cs = c + offs_k
        c_ok = cs < C_IN
        ptrs = x_ptrs[:, None] + cs[None, :] * x_stride_channel
        mask = m_ok[:, None] & c_ok[None, :]
        pooled = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for dy in range(PH):
            for dx in range(PW):
                pooled += tl.load(ptrs + dy * x_stride_row + dx * x_stride_col, mask=mask,
                                  other=0.0).to(tl.float32)
        pooled = (pooled / (PH * PW)).to(W.dtype.element_ty)
        w_ptrs = W + cs[:, None] * w_stride_in
        w_head = tl.load(w_ptrs + head[None, :] * w_stride_out,
                         mask=c_ok[:, None] & head_ok[None, :], other=0.0)
        w_tail = tl.load(w_ptrs + tail[None, :] * w_stride_out,
                         mask=c_ok[:, None] & tail_ok[None, :], other=0.0)
        acc_head = tl.dot(pooled, w_head, acc_head, input_precision=PRECISION)
        acc_tail = tl.dot(pooled, w_tail, acc_tail, input_precision=PRECISION)
    y_head = acc_head + tl.load(BIAS + head, mask=head_ok, other=0.0).to(tl.float32)[None, :]
    y_tail = acc_tail + tl.load(BIAS + tail, mask=tail_ok, other=0.0).to(tl.float32)[None, :]
    mean = (tl.sum(y_head, 1) + tl.sum(y_tail, 1)) / C_OUT  # padded channels hold exact zeros
    d_head = tl.where(head_ok[None, :], y_head - mean[:, None], 0.0)
    d_tail = tl.where(tail_ok[None, :], y_tail - mean[:, None], 0.0)
    var = (tl.sum(d_head * d_head, 1) + tl.sum(d_tail * d_tail, 1)) / C_OUT
    rstd = tl.rsqrt(var + eps)
    _ln_gelu_store(OUT, offs_m, m_ok, head, d_head, rstd, LN_W, LN_B, C_OUT)
    _ln_gelu_store(OUT, offs_m, m_ok, tail, d_tail, rstd, LN_W, LN_B, C_OUT)


@kernel(key=['C_IN', 'C_OUT', 'PH', 'PW', 'PRECISION'],
        interpret=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), configs=[
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
            dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
        ], ieee_configs=[
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
            dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
        ])
def _fcu_up_kernel(T, W, BIAS, SCALE, SHIFT, ADD, OUT, M, L, GW, C_IN, C_OUT, PH, PW,
                   t_stride_batch, t_stride_token, t_stride_channel, w_stride_out, w_stride_in,
                   add_stride_batch, add_stride_channel, add_stride_row, add_stride_col,
                   out_stride_batch, out_stride_channel, out_stride_row, out_stride_col,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """BLOCK_M tokens x BLOCK_N channels, each written PH x PW times into the output."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(C_OUT, BLOCK_N)
    offs_m = pid // n_blocks * BLOCK_M + tl.arange(0, BLOCK_M)  # token index over B * L
    offs_n = pid % n_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < C_OUT
    b, token = (offs_m // L).to(tl.int64), offs_m % L  # batch offsets of large inputs pass 2**31
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    t_ptrs = T + (b * t_stride_batch + token * t_stride_token)[:, None]
    for c in range(0, C_IN, BLOCK_K):
        cs = c + offs_k
        c_ok = cs < C_IN
        t = tl.load(t_ptrs + cs[None, :] * t_stride_channel, mask=m_ok[:, None] & c_ok[None, :],
                    other=0.0)
        w = tl.load(W + offs_n[None, :] * w_stride_out + cs[:, None] * w_stride_in,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(t, w, acc, input_precision=PRECISION)
    bias = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = tl.maximum((acc + bias[None, :]) * scale[None, :] + shift[None, :], 0.0)
    y0, x0 = token // GW * PH, token % GW * PW  # top-left pixel of each token's window
    add_ptrs = ADD + (b * add_stride_batch + y0 * add_stride_row + x0 * add_stride_col)[:, None] \
        + offs_n[None, :] * add_stride_channel
    out_ptrs = OUT + (b * out_stride_batch + y0 * out_stride_row + x0 * out_stride_col)[:, None] \
        + offs_n[None, :] * out_stride_channel
    mask = m_ok[:, None] & n_ok[None, :]
    for dy in range(PH):
        for dx in range(PW):
            a = tl.load(add_ptrs + dy * add_stride_row + dx * add_stride_col, mask=mask,
                        other=0.0).to(tl.float32)
            tl.store(out_ptrs + dy * out_stride_row + dx * out_stride_col,
                     (a + y).to(OUT.dtype.element_ty), mask=mask)


def _grid_limit(map_hw, grid_hw):
    if map_hw[0] % grid_hw[0] or map_hw[1] % grid_hw[1]:
        return (f'the map size {map_hw[0]}x{map_hw[1]} must be a multiple of the token grid '
                f'{grid_hw[0]}x{grid_hw[1]}')
    return None


def _conv1x1_limit(weight):
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        return ('weight must be a 1x1 conv weight (C_out, C_in, 1, 1), '
                f'got {tuple(weight.shape)}')
    return None


def _fcu_down_limit(x, weight, grid_hw):
    if weight.shape[0] > 1024:
        return (f'at most 1024 output channels (got {weight.shape[0]}): a LayerNorm row must fit '
                'one tile')
    return (_conv1x1_limit(weight) or _grid_limit(x.shape[-2:], grid_hw) or tensor_limit(x)
            or tensor_limit(weight))


def _fcu_up_limit(tokens, weight, out_hw, grid_hw, add_to):
    return (_conv1x1_limit(weight) or _grid_limit(out_hw, grid_hw) or tensor_limit(tokens)
            or tensor_limit(weight) or tensor_limit(add_to))


def row_split(channels):
    """(HEAD_N, TAIL_N): two power-of-two blocks (each >= 16, tl.dot's minimum) covering a
    LayerNorm row of ``channels``, the head the largest power of two below it."""
    head = max(16, 1 << (channels - 1).bit_length() - 1)
    return head, next_pow2(max(channels - head, 1))


def _fcu_down_output(x, weight, grid_hw):
    """Tokens in the dtype the reference returns: x's, or under autocast its LayerNorm's, which
    keeps the compute dtype on CPU but is fp32 on CUDA. A zero-element probe asks PyTorch's own
    autocast policy and runs nothing; without autocast it is not needed."""
    device = x.device.type  # 'meta' too (the compile check), which has no autocast
    dtype = x.dtype
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = F.layer_norm(x.new_empty(0, 1), (1,)).dtype
    return x.new_empty(x.shape[0], grid_hw[0] * grid_hw[1], weight.shape[0], dtype=dtype)


def fcu_down_launch(x, weight, bias, grid_hw, ln_weight, ln_bias, ln_eps, out, precision):
    """FCU-down's :class:`Launch` writing ``out``; ``precision`` as from ``dot_precision``."""
    B, C_in, H, W = x.shape
    C_out, L = weight.shape[0], grid_hw[0] * grid_hw[1]
    head, tail = row_split(C_out)
    args = (x, weight, bias, ln_weight, ln_bias, out, B * L, L, grid_hw[1], C_in, C_out,
            H // grid_hw[0], W // grid_hw[1], ln_eps, *x.stride(), weight.stride(0),
            weight.stride(1))
    def grid(meta):
        return (triton.cdiv(B * L, meta['BLOCK_M']),)

    return Launch(_fcu_down_kernel, grid, args, dict(HEAD_N=head, TAIL_N=tail, PRECISION=precision))


def fcu_up_launch(tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to, out,
                  precision):
    """FCU-up's :class:`Launch` writing ``out``; ``precision`` as from ``dot_precision``."""
    B, L, C_in = tokens.shape
    C_out = weight.shape[0]

    def grid(meta):
        return (triton.cdiv(B * L, meta['BLOCK_M']) * triton.cdiv(C_out, meta['BLOCK_N']),)

    args = (tokens, weight, bias, bn_scale, bn_shift, add_to, out, B * L, L, grid_hw[1], C_in,
            C_out, out_hw[0] // grid_hw[0], out_hw[1] // grid_hw[1], *tokens.stride(),
            weight.stride(0), weight.stride(1), *add_to.stride(), *out.stride())
    return Launch(_fcu_up_kernel, grid, args, dict(PRECISION=precision))


def _fcu_down_triton(x, weight, bias, grid_hw, ln_weight, ln_bias, ln_eps):
    dtype = compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    out = _fcu_down_output(x, weight, grid_hw)
    precision = dot_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32)
    fcu_down_launch(x, weight, bias, grid_hw, ln_weight, ln_bias, ln_eps, out, precision).run()
    return out


def _fcu_up_triton(tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to):
    dtype = compute_dtype(tokens)
    tokens, weight = tokens.to(dtype), weight.to(dtype)
    out = torch.empty_like(add_to)
    precision = dot_precision(tokens.dtype, torch.backends.cuda.matmul.allow_tf32)
    fcu_up_launch(tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to, out,
                  precision).run()
    return out


def fcu_down(x, weight, bias, grid_hw, ln_weight, ln_bias, ln_eps, backend=None):
    """CNN map (B, C_in, H, W) -> tokens (B, Hg*Wg, C_out), without the class token.

    Average pool, 1x1 conv, LayerNorm, then exact GELU. Inference-only Triton path (see module
    docstring).

    Args:
        x: CNN map (B, C_in, H, W).
        weight: 1x1 conv weight (C_out, C_in, 1, 1).
        bias: conv bias (C_out,).
        grid_hw: (Hg, Wg), the token grid the map is average-pooled to (adaptively if H, W are
            not multiples of it).
        ln_weight: LayerNorm weight (C_out,).
        ln_bias: LayerNorm bias (C_out,).
        ln_eps: LayerNorm epsilon.
        backend: overrides the default backend (see :mod:`conformer.kernels.backend`).
    """
    grid_hw = tuple(grid_hw)
    args = (x, weight, bias, grid_hw, ln_weight, ln_bias, ln_eps)
    if dispatch('fcu_down', backend, (x, weight, bias, ln_weight, ln_bias),
                triton_limit=lambda: _fcu_down_limit(x, weight, grid_hw)) == 'triton':
        return _fcu_down_triton(*args)
    return fcu_down_reference(*args)


def fcu_up(tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to, backend=None):
    """Tokens (B, Hg*Wg, C_in), class token already dropped -> add_to + upsampled map.

    1x1 conv, folded BatchNorm, ReLU, nearest upsample, add. Inference-only Triton path.

    Args:
        tokens: (B, Hg*Wg, C_in), class token already dropped.
        grid_hw: (Hg, Wg), the token grid.
        weight: 1x1 conv weight (C_out, C_in, 1, 1).
        bias: conv bias (C_out,).
        bn_scale: (C_out,) per-channel multiplier from the folded BatchNorm.
        bn_shift: (C_out,) per-channel offset from the folded BatchNorm.
        out_hw: (H, W), the size of ``add_to``, reached by nearest upsampling.
        add_to: (B, C_out, H, W) map the result is added to (not modified).
        backend: overrides the default backend (see :mod:`conformer.kernels.backend`).

    Returns:
        A new tensor laid out like ``add_to``.

    Raises:
        ValueError: ``tokens`` do not fill ``grid_hw``, or ``out_hw`` is not ``add_to``'s size.
    """
    grid_hw, out_hw = tuple(grid_hw), tuple(out_hw)
    if tokens.shape[1] != grid_hw[0] * grid_hw[1]:
        raise ValueError(f'fcu_up: {tokens.shape[1]} tokens do not fill the '
                         f'{grid_hw[0]}x{grid_hw[1]} grid (drop the class token first)')
    if tuple(add_to.shape[-2:]) != out_hw:
        raise ValueError(f'fcu_up: out_hw {out_hw} differs from the size of add_to '
                         f'{tuple(add_to.shape[-2:])}')
    args = (tokens, grid_hw, weight, bias, bn_scale, bn_shift, out_hw, add_to)
    if dispatch('fcu_up', backend, (tokens, weight, bias, bn_scale, bn_shift, add_to),
                triton_limit=lambda: _fcu_up_limit(tokens, weight, out_hw, grid_hw, add_to)
                ) == 'triton':
        return _fcu_up_triton(*args)
    return fcu_up_reference(*args)
