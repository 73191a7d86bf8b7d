"""Fused attention (Triton, run by the interpreter on CPU) against an fp64 softmax reference.

Tolerances, outputs and q/k/v gradients alike: fp32 (IEEE dots; the interpreter does not emulate
TF32, tools/gpu_check.py holds its GPU tolerance) 2e-5 abs + 2e-5 rel, summation order and fp32
rounding only; fp16 5e-3 abs + 5e-3 rel (fp16 probabilities enter P @ V and dS @ K, each output
is rounded to fp16 once). bf16 is left to tools/gpu_check.py: the interpreter's bf16 math is wrong.
"""

import pytest
import torch

from conformer.kernels import attention
from conformer.kernels.flash_attention import _forward_outputs, backward_launches, forward_launch

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _qkv(B, H, N, D, dtype, packed):
    """q, k, v as leaves; ``packed`` makes them strided views of one (B, N, 3, H, D) tensor,
    the layout a ViT block produces."""
    if packed:
        qkv = torch.randn(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
        return [t.detach().requires_grad_() for t in qkv.unbind(0)]  # views, not copies
    return [torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]


def _reference(q, k, v, grad, scale):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    out.backward(grad.double())
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('D', [64, 96])
@pytest.mark.parametrize('B, H, N, packed', [(1, 2, 197, True), (3, 1, 50, False)],
                         ids=['197tok', '50tok'])
def test_attention_matches_reference(B, H, N, packed, D, dtype):
    torch.manual_seed(0)
    q, k, v = _qkv(B, H, N, D, dtype, packed)
    out = attention(q, k, v, backend='triton')
    assert type(out.grad_fn).__name__ == 'FlashAttentionBackward'
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # merging heads afterwards is a free view
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = _reference(q, k, v, grad, D**-0.5)
    for name, got, want in zip(['out', 'dq', 'dk', 'dv'], [out, q.grad, k.grad, v.grad], expected):
        torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=lambda m: f'{name}: {m}')


def test_attention_custom_scale_matches_sdpa_path():
    torch.manual_seed(0)
    q, k, v = _qkv(2, 3, 20, 64, torch.float32, packed=False)
    got = attention(q, k, v, scale=0.3, backend='triton')
    want = attention(q, k, v, scale=0.3, backend='torch')
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_attention_dropout_runs_in_pytorch():
    q, k, v = _qkv(1, 2, 20, 64, torch.float32, packed=False)
    out = attention(q, k, v, dropout_p=0.5, backend='triton')
    assert 'FlashAttention' not in type(out.grad_fn).__name__
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_cpu_low_precision_torch_path_matches_reference(dtype):
    """The matmul path bf16/fp16 take on the CPU instead of the fused SDPA kernel: outputs and
    gradients within one rounding of the inputs' precision (bf16 eps 2**-8, fp16 2**-11) of fp32."""
    torch.manual_seed(0)
    q, k, v = _qkv(3, 2, 197, 64, dtype, packed=True)
    out = attention(q, k, v, scale=0.2, backend='torch')
    assert out.dtype == dtype and 'FlashAttention' not in type(out.grad_fn).__name__
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = _reference(q, k, v, grad, 0.2)
    tol = dict(atol=4e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    for name, got, want in zip(['out', 'dq', 'dk', 'dv'], [out, q.grad, k.grad, v.grad], expected):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f'{name}: {m}')


def test_attention_grid_is_one_axis_for_any_batch():
    """B * H programs per row block on grid axis 0 (2**31 - 1), not axis 1 (65535): at B = 20000
    with 6 heads the old (row blocks, B * H) grid could not launch."""
    B, H, N, D = 20000, 6, 197, 64
    q, k, v = torch.empty(B, N, 3, H, D, device='meta').permute(2, 0, 3, 1, 4).unbind(0)
    o, lse = _forward_outputs(q)
    grads = [torch.empty_like(t) for t in (o, lse, q, k, v)]
    launches = [forward_launch(q, k, v, o, lse, D**-0.5, 'ieee'),
                *backward_launches(q, k, v, o, lse, *grads, D**-0.5, 'ieee')]
    for launch in launches:
        grid = launch.grid(dict(BLOCK_M=64, BLOCK_N=64))
        assert grid == (B * H * 4,) and grid[0] < 2**31
