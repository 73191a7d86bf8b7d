"""Fused multi-head attention, FlashAttention-2 style, forward and backward.

Forward: a program owns a block of queries of one (batch, head) and streams over key/value
blocks with an online softmax, so the N x N scores never reach memory; it saves the row
logsumexp. Backward recomputes the probabilities from q, k and that logsumexp: one kernel
accumulates dK and dV per key block, another dQ per query block (no atomics, deterministic).

Contract: q, k, v of one shape (B, H, N, D), any strides. Any N (rows and columns past N are
masked: 197 tokens at 224 px); D <= 128, its arange padded to a power of two (96 -> 128) and
masked. fp16, bf16, fp32; softmax statistics and accumulators are fp32. fp32 dots are TF32
(10-bit mantissa inputs, errors near fp16's) only if ``torch.backends.cuda.matmul.allow_tf32``
is set, else IEEE fp32 (FMA loops, on smaller tiles). The grid is 1-D and batch/head offsets
are int64, so any batch size works. NVIDIA compile needs every tl.dot
dimension >= 16 for 16-bit inputs (K >= 8 for fp32) and power-of-two aranges: all blocks
below are >= 16 and the padded head dim is >= 16.
"""

from typing import Optional

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

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The PyTorch path: F.scaled_dot_product_attention (non-causal).

    Except bf16/fp16 on the CPU, where PyTorch's fused kernel runs slower than two
    batched matmuls at Conformer's token counts (17-197 tokens, forward and backward), so
    there the scores are materialised: the softmax accumulates in fp32 and rounds once.

    Arguments as :func:`attention` (which has ``backend`` besides).
    """
    if q.device.type == 'cpu' and q.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


@jit
def _tile_ptrs(base, rows, offs_d, stride_n, stride_d):
    """Pointers of a (rows x padded head dim) tile of one (batch, head)."""
    return base + rows[:, None] * stride_n + offs_d[None, :] * stride_d


@jit
def _tile_mask(rows, N, offs_d, HEAD_DIM: tl.constexpr):
    """Which elements of a (rows x padded head dim) tile exist. A loop must not reassign a
    mask made outside it with one of another shape (BLOCK_M != BLOCK_N): compiled Triton
    rejects loop-carried values that change type."""
    return (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)


@jit
def _program(H, N, BLOCK: tl.constexpr):
    """(batch, head, batch * H + head, first row) of this program's block of rows.

    The grid is 1-D, so B * H has no 65535 limit, and runs the row blocks of one head next to
    each other, so they share its K and V in L2. Batch and head are int64: their offsets into
    a large batch (q is a view of the packed qkv) would wrap in int32.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    bh = (pid // n_blocks).to(tl.int64)
    return bh // H, bh % H, bh, pid % n_blocks * BLOCK


@kernel(key=['N', 'HEAD_DIM', 'PRECISION'], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
], ieee_configs=[  # 64 x 32 with 4 warps spills
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
])
def _attn_fwd(Q, K, V, OUT, LSE, qk_scale, H, N,
              q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
              k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
              v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
              o_stride_batch, o_stride_head, o_stride_token, o_stride_dim,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and the base-2 row logsumexp of one block of queries of one (batch, head)."""
    b, h, bh, first_row = _program(H, N, BLOCK_M)
    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_head = K + b * k_stride_batch + h * k_stride_head
    v_head = V + b * v_stride_batch + h * v_stride_head
    q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    q_ptrs = _tile_ptrs(Q + b * q_stride_batch + h * q_stride_head, rows, offs_d,
                        q_stride_token, q_stride_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
        k = tl.load(_tile_ptrs(k_head, cols, offs_d, k_stride_token, k_stride_dim), mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N, s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile_ptrs(v_head, cols, offs_d, v_stride_token, v_stride_dim), mask=kv_mask,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o_ptrs = _tile_ptrs(OUT + b * o_stride_batch + h * o_stride_head, rows, offs_d,
                        o_stride_token, o_stride_dim)
    tl.store(o_ptrs, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=rows < N)


@kernel(key=['N', 'HEAD_DIM'], interpret=dict(BLOCK_M=128), configs=[dict(BLOCK_M=64, num_warps=4)])
def _attn_bwd_delta(OUT, DO, DELTA, H, N,
                    o_stride_batch, o_stride_head, o_stride_token, o_stride_dim,
                    do_stride_batch, do_stride_head, do_stride_token, do_stride_dim,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term."""
    b, h, bh, first_row = _program(H, N, BLOCK_M)
    rows = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    o_ptrs = _tile_ptrs(OUT + b * o_stride_batch + h * o_stride_head, rows, offs_d,
                        o_stride_token, o_stride_dim)
    do_ptrs = _tile_ptrs(DO + b * do_stride_batch + h * do_stride_head, rows, offs_d,
                         do_stride_token, do_stride_dim)
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + rows, tl.sum(o * do, 1), mask=rows < N)


@kernel(key=['N', 'HEAD_DIM', 'PRECISION'], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
], ieee_configs=[  # 32 x 64 with 4 warps spills
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, scale, qk_scale, H, N,
                   q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
                   k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
                   v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
                   do_stride_batch, do_stride_head, do_stride_token, do_stride_dim,
                   dk_stride_batch, dk_stride_head, dk_stride_token, dk_stride_dim,
                   dv_stride_batch, dv_stride_head, dv_stride_token, dv_stride_dim,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one block of keys, looping over all query blocks (scores kept transposed)."""
    b, h, bh, first_col = _program(H, N, BLOCK_N)
    cols = first_col + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_head = Q + b * q_stride_batch + h * q_stride_head
    do_head = DO + b * do_stride_batch + h * do_stride_head
    kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
    k_ptrs = _tile_ptrs(K + b * k_stride_batch + h * k_stride_head, cols, offs_d,
                        k_stride_token, k_stride_dim)
    v_ptrs = _tile_ptrs(V + b * v_stride_batch + h * v_stride_head, cols, offs_d,
                        v_stride_token, v_stride_dim)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + offs_m
        q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
        q = tl.load(_tile_ptrs(q_head, rows, offs_d, q_stride_token, q_stride_dim), mask=q_mask,
                    other=0.0)
        do = tl.load(_tile_ptrs(do_head, rows, offs_d, do_stride_token, do_stride_dim),
                     mask=q_mask, other=0.0)
        # lse = +inf past N makes those probabilities exactly 0
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float('inf'))
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = _tile_ptrs(DK + b * dk_stride_batch + h * dk_stride_head, cols, offs_d,
                         dk_stride_token, dk_stride_dim)
    dv_ptrs = _tile_ptrs(DV + b * dv_stride_batch + h * dv_stride_head, cols, offs_d,
                         dv_stride_token, dv_stride_dim)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@kernel(key=['N', 'HEAD_DIM', 'PRECISION'], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
], ieee_configs=[  # 64 x 32 with 4 warps spills
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, qk_scale, H, N,
                 q_stride_batch, q_stride_head, q_stride_token, q_stride_dim,
                 k_stride_batch, k_stride_head, k_stride_token, k_stride_dim,
                 v_stride_batch, v_stride_head, v_stride_token, v_stride_dim,
                 do_stride_batch, do_stride_head, do_stride_token, do_stride_dim,
                 dq_stride_batch, dq_stride_head, dq_stride_token, dq_stride_dim,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one block of queries, looping over all key blocks."""
    b, h, bh, first_row = _program(H, N, BLOCK_M)
    rows = first_row + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_head = K + b * k_stride_batch + h * k_stride_head
    v_head = V + b * v_stride_batch + h * v_stride_head
    q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    q_ptrs = _tile_ptrs(Q + b * q_stride_batch + h * q_stride_head, rows, offs_d,
                        q_stride_token, q_stride_dim)
    do_ptrs = _tile_ptrs(DO + b * do_stride_batch + h * do_stride_head, rows, offs_d,
                         do_stride_token, do_stride_dim)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
        k = tl.load(_tile_ptrs(k_head, cols, offs_d, k_stride_token, k_stride_dim), mask=kv_mask,
                    other=0.0)
        v = tl.load(_tile_ptrs(v_head, cols, offs_d, v_stride_token, v_stride_dim), mask=kv_mask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(cols[None, :] < N, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PRECISION)
    dq_ptrs = _tile_ptrs(DQ + b * dq_stride_batch + h * dq_stride_head, rows, offs_d,
                         dq_stride_token, dq_stride_dim)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _grid(B, H, N, block):
    """The 1-D grid of :func:`_program`: every row block (``block`` rows) of every head."""
    return lambda meta: (B * H * triton.cdiv(N, meta[block]),)


def _forward_outputs(q):
    """The output, a (B, H, N, D) view of a token-major buffer (merging the heads afterwards,
    ``o.transpose(1, 2).reshape(B, N, H * D)``, is then free), and the row logsumexp."""
    B, H, N, D = q.shape
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    return q.new_empty(B, N, H, D).transpose(1, 2), lse


def forward_launch(q, k, v, o, lse, scale, precision):
    """The forward kernel's :class:`Launch`; ``precision`` as from ``dot_precision``."""
    B, H, N, D = q.shape
    args = (q, k, v, o, lse, scale * LOG2E, H, N, *q.stride(), *k.stride(), *v.stride(),
            *o.stride())
    return Launch(_attn_fwd, _grid(B, H, N, 'BLOCK_M'), args,
                  dict(HEAD_DIM=D, BLOCK_D=next_pow2(D), PRECISION=precision))


def backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, scale, precision):
    """The backward's three :class:`Launch` es, in order: delta, then dK and dV, then dQ."""
    B, H, N, D = q.shape
    head_dim = dict(HEAD_DIM=D, BLOCK_D=next_pow2(D))
    common = (scale, scale * LOG2E, H, N, *q.stride(), *k.stride(), *v.stride(), *do.stride())
    return [
        Launch(_attn_bwd_delta, _grid(B, H, N, 'BLOCK_M'),
               (o, do, delta, H, N, *o.stride(), *do.stride()), head_dim),
        Launch(_attn_bwd_dkdv, _grid(B, H, N, 'BLOCK_N'),
               (q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride()),
               dict(head_dim, PRECISION=precision)),
        Launch(_attn_bwd_dq, _grid(B, H, N, 'BLOCK_M'),
               (q, k, v, do, lse, delta, dq, *common, *dq.stride()),
               dict(head_dim, PRECISION=precision)),
    ]


class FlashAttention(torch.autograd.Function):
    """Triton forward and backward; saves q, k, v, the output and the row logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward_outputs(q)
        precision = dot_precision(q.dtype, torch.backends.cuda.matmul.allow_tf32)
        forward_launch(q, k, v, o, lse, scale, precision).run()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.precision = scale, precision
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for launch in backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, ctx.scale,
                                        ctx.precision):
            launch.run()
        return dq, dk, dv, None


def _limit(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return ('q, k, v must be (B, H, N, D) tensors of one shape (self-attention); got '
                f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if q.shape[-1] > 128:
        return f'head dim D must be at most 128 (got {q.shape[-1]})'
    return tensor_limit(q, k, v)


def attention(q, k, v, scale=None, dropout_p=0.0, backend=None):
    """softmax(q @ k^T * scale) @ v, differentiable on both paths.

    Args:
        q: queries (B, H, N, D); the Triton path takes D <= 128.
        k: keys, the shape of ``q``.
        v: values, the shape of ``q``.
        scale: multiplier of q @ k^T; None means D**-0.5.
        dropout_p: dropout probability on the attention weights. ``> 0`` always runs
            F.scaled_dot_product_attention: fused dropout is not implemented (pass 0 in eval
            mode).
        backend: overrides the default (see conformer.kernels.backend).

    Returns:
        (B, H, N, D); the Triton path lays it out token-major so merging heads with
        ``.transpose(1, 2).reshape(B, N, H * D)`` costs no copy.
    """
    if dispatch('attention', backend, (q, k, v), triton_limit=lambda: _limit(q, k, v),
                differentiable=('triton',), reference_only=dropout_p > 0) == 'triton':
        dtype = compute_dtype(q)  # autocast runs the reference's SDPA in its dtype too
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return FlashAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return attention_reference(q, k, v, scale, dropout_p)
