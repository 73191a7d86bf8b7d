"""Fused multi-head attention, FlashAttention-2 style, forward and backward.

Forward: a program owns a block of queries of one (batch, head) and streams over key/value
blocks with an online softmax, so the N x N scores never reach memory; it saves the row
logsumexp. Backward recomputes the probabilities from q, k and that logsumexp: one kernel
accumulates dK and dV per key block, another dQ per query block (no atomics, deterministic).

Contract: q, k, v of one shape (B, H, N, D), any strides. Any N (rows and columns past N are
masked: 197 tokens at 224 px); D <= 128, its arange padded to a power of two (96 -> 128) and
masked. fp16, bf16, fp32; softmax statistics and accumulators are fp32. fp32 inputs use TF32
only if ``torch.backends.cuda.matmul.allow_tf32`` is set. NVIDIA compile needs every tl.dot
dimension >= 16 for 16-bit inputs (K >= 8 for fp32) and power-of-two aranges: all blocks
below are >= 16 and the padded head dim is >= 16.
"""

import torch
import torch.nn.functional as F

from .backend import dot_precision, jit, kernel, next_pow2, tensor_limit, tl, triton, use_triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


def attention_reference(q, k, v, scale=None, dropout_p=0.0):
    """The PyTorch path: F.scaled_dot_product_attention (non-causal).

    Except bf16/fp16 on the CPU, where PyTorch's fused kernel runs 1.5-7x slower than two
    batched matmuls at Conformer's token counts (17-197 tokens, forward and backward), so
    there the scores are materialised: the softmax accumulates in fp32 and rounds once.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0:
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


@kernel(key=["N", "HEAD_DIM"], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
])
def _attn_fwd(Q, K, V, O, LSE, qk_scale, H, N,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and the base-2 row logsumexp of one query block; grid (cdiv(N, BLOCK_M), B * H)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
        k = tl.load(_tile_ptrs(K + b * skb + h * skh, cols, offs_d, skn, skd), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile_ptrs(V + b * svb + h * svh, cols, offs_d, svn, svd), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    tl.store(_tile_ptrs(O + b * sob + h * soh, rows, offs_d, son, sod),
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i), mask=rows < N)


@kernel(key=["N", "HEAD_DIM"], interpret=dict(BLOCK_M=128), configs=[dict(BLOCK_M=64, num_warps=4)])
def _attn_bwd_delta(O, DO, DELTA, H, N, sob, soh, son, sod, sdb, sdh, sdn, sdd,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    o = tl.load(_tile_ptrs(O + b * sob + h * soh, rows, offs_d, son, sod), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + b * sdb + h * sdh, rows, offs_d, sdn, sdd), mask=mask, other=0.0)
    o, do = o.to(tl.float32), do.to(tl.float32)
    tl.store(DELTA + bh * N + rows, tl.sum(o * do, 1), mask=rows < N)


@kernel(key=["N", "HEAD_DIM"], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, scale, qk_scale, H, N,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                   sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block, looping over all query blocks (scores kept transposed)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
    k = tl.load(_tile_ptrs(K + b * skb + h * skh, cols, offs_d, skn, skd), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(V + b * svb + h * svh, cols, offs_d, svn, svd), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + offs_m
        q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
        q = tl.load(_tile_ptrs(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)
        do = tl.load(_tile_ptrs(DO + b * sdb + h * sdh, rows, offs_d, sdn, sdd), mask=q_mask, other=0.0)
        # lse = +inf past N makes those probabilities exactly 0
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(_tile_ptrs(DK + b * sdkb + h * sdkh, cols, offs_d, sdkn, sdkd),
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV + b * sdvb + h * sdvh, cols, offs_d, sdvn, sdvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@kernel(key=["N", "HEAD_DIM"], interpret=dict(BLOCK_M=128, BLOCK_N=128), configs=[
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, qk_scale, H, N,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                 sdqb, sdqh, sdqn, sdqd,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, looping over all key blocks."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _tile_mask(rows, N, offs_d, HEAD_DIM)
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd), mask=q_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + b * sdb + h * sdh, rows, offs_d, sdn, sdd), mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = _tile_mask(cols, N, offs_d, HEAD_DIM)
        k = tl.load(_tile_ptrs(K + b * skb + h * skh, cols, offs_d, skn, skd), mask=kv_mask, other=0.0)
        v = tl.load(_tile_ptrs(V + b * svb + h * svh, cols, offs_d, svn, svd), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(cols[None, :] < N, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PRECISION)
    tl.store(_tile_ptrs(DQ + b * sdqb + h * sdqh, rows, offs_d, sdqn, sdqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


class FlashAttention(torch.autograd.Function):
    """Triton forward and backward; saves q, k, v, the output and the row logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, N, D = q.shape
        # A (B, H, N, D) view of a token-major buffer: merging the heads afterwards
        # (o.transpose(1, 2).reshape(B, N, H * D)) is then free.
        o = q.new_empty(B, N, H, D).transpose(1, 2)
        lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
        precision = dot_precision(q.dtype, torch.backends.cuda.matmul.allow_tf32)
        _attn_fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, scale * LOG2E, H, N, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            HEAD_DIM=D, BLOCK_D=next_pow2(D), PRECISION=precision)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.precision = scale, precision
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, N, D = q.shape
        shape = dict(HEAD_DIM=D, BLOCK_D=next_pow2(D))
        delta = torch.empty_like(lse)
        _attn_bwd_delta[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            o, do, delta, H, N, *o.stride(), *do.stride(), **shape)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (ctx.scale, ctx.scale * LOG2E, H, N, *q.stride(), *k.stride(), *v.stride(), *do.stride())
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
            PRECISION=ctx.precision, **shape)
        _attn_bwd_dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *common, *dq.stride(), PRECISION=ctx.precision, **shape)
        return dq, dk, dv, None


def _limit(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return ("q, k, v must be (B, H, N, D) tensors of one shape (self-attention); got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 128:
        return f"head dim D must be at most 128 (got {q.shape[-1]})"
    return tensor_limit(q, k, v)


def attention(q, k, v, scale=None, dropout_p=0.0, backend=None):
    """softmax(q @ k^T * scale) @ v for q, k, v of shape (B, H, N, D); scale defaults to D**-0.5.

    Differentiable on both paths. ``dropout_p > 0`` always runs F.scaled_dot_product_attention:
    fused dropout is not implemented (pass 0 in eval mode). ``backend`` overrides the default
    (see conformer.kernels.backend). Returns (B, H, N, D); the Triton path lays it out token-major
    so merging heads with ``.transpose(1, 2).reshape(B, N, H * D)`` costs no copy.
    """
    if use_triton("attention", backend, (q, k, v), lambda: _limit(q, k, v), torch_only=dropout_p > 0):
        return FlashAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return attention_reference(q, k, v, scale, dropout_p)
