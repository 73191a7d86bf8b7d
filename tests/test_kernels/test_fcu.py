"""Fused feature-coupling units (Triton, interpreted on CPU) against the PyTorch path.

The reference runs in fp64 on the same (rounded) inputs. Tolerances: fp32 (IEEE dots; the
interpreter does not emulate TF32) 2e-5 abs + 2e-5 rel; fp16 1e-2 abs + 1e-2 rel (16-bit GEMM
inputs, LayerNorm-scaled outputs of magnitude ~3, one fp16 rounding).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conformer.kernels import fcu_down, fcu_up
from conformer.kernels.fcu import fcu_down_reference, fcu_up_reference, row_split

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
DTYPES = pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])


def _down_args(B, C_in, H, W, C_out, grid_hw, dtype):
    x = torch.randn(B, C_in, H, W, dtype=dtype)
    weight = (torch.randn(C_out, C_in, 1, 1) / C_in**0.5).to(dtype)
    bias, ln_bias = torch.randn(C_out, dtype=dtype), torch.randn(C_out, dtype=dtype)
    ln_weight = (torch.rand(C_out) + 0.5).to(dtype)
    return x, weight, bias, grid_hw, ln_weight, ln_bias, 1e-6


def _up_args(B, grid_hw, C_in, C_out, out_hw, dtype, channels_last=False):
    tokens = torch.randn(B, grid_hw[0] * grid_hw[1], C_in, dtype=dtype)
    weight = (torch.randn(C_out, C_in, 1, 1) / C_in**0.5).to(dtype)
    bias = torch.randn(C_out, dtype=dtype)
    scale, shift = torch.rand(C_out) + 0.5, torch.randn(C_out)
    add_to = torch.randn(B, C_out, *out_hw, dtype=dtype)
    if channels_last:
        add_to = add_to.to(memory_format=torch.channels_last)
    return tokens, grid_hw, weight, bias, scale, shift, out_hw, add_to


def _fp64(args):
    return [a.double() if isinstance(a, torch.Tensor) else a for a in args]


@DTYPES
@pytest.mark.parametrize('B, C_in, H, W, C_out, grid_hw', [
    (3, 24, 8, 12, 40, (2, 3)),  # dw_stride 4, non-square grid
    (1, 40, 7, 9, 24, (7, 9)),  # dw_stride 1 (Conformer's last stage), odd sizes
], ids=['dw4', 'dw1-odd'])
def test_fcu_down_matches_reference(B, C_in, H, W, C_out, grid_hw, dtype):
    torch.manual_seed(0)
    args = _down_args(B, C_in, H, W, C_out, grid_hw, dtype)
    out = fcu_down(*args, backend='triton')
    assert out.shape == (B, grid_hw[0] * grid_hw[1], C_out) and out.dtype == dtype
    torch.testing.assert_close(out.double(), fcu_down_reference(*_fp64(args)), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize('B, grid_hw, C_in, C_out, out_hw, channels_last', [
    (3, (3, 5), 40, 24, (9, 15), False),  # up_stride 3: nearest must match F.interpolate exactly
    (1, (7, 9), 24, 40, (14, 18), True),
], ids=['x3', 'x2-odd-nhwc'])
def test_fcu_up_matches_reference(B, grid_hw, C_in, C_out, out_hw, channels_last, dtype):
    torch.manual_seed(0)
    args = _up_args(B, grid_hw, C_in, C_out, out_hw, dtype, channels_last)
    out = fcu_up(*args, backend='triton')
    assert out.shape == args[-1].shape and out.dtype == dtype
    assert out.stride() == args[-1].stride()  # laid out like add_to
    torch.testing.assert_close(out.double(), fcu_up_reference(*_fp64(args)), **TOL[dtype])


def test_fcu_down_uneven_map_uses_adaptive_pooling():
    """13x13 onto a 4x4 grid: 'triton' names the limit, 'auto' runs adaptive pooling."""
    args = _down_args(1, 24, 13, 13, 40, (4, 4), torch.float32)
    with pytest.raises(ValueError, match='multiple of the token grid 4x4'):
        fcu_down(*args, backend='triton')
    x, weight, bias, grid_hw, *ln = args
    conv = torch.nn.functional.conv2d(x, weight, bias)
    pooled = torch.nn.functional.adaptive_avg_pool2d(conv, (4, 4)).flatten(2).transpose(1, 2)
    want = torch.nn.functional.gelu(torch.nn.functional.layer_norm(pooled, (40,), *ln))
    torch.testing.assert_close(fcu_down(*args), want)


def test_fcu_up_uneven_map_falls_back():
    args = _up_args(1, (3, 5), 24, 40, (8, 13), torch.float32)
    with pytest.raises(ValueError, match='map size 8x13 must be a multiple of the token grid 3x5'):
        fcu_up(*args, backend='triton')
    torch.testing.assert_close(fcu_up(*args, backend='auto'), fcu_up_reference(*args))


def test_fcu_up_rejects_class_token():
    tokens, grid_hw, *rest = _up_args(1, (3, 5), 24, 40, (6, 10), torch.float32)
    with_cls = torch.cat([tokens[:, :1], tokens], 1)
    with pytest.raises(ValueError, match='drop the class token'):
        fcu_up(with_cls, grid_hw, *rest)


@pytest.mark.parametrize('C_out', [384, 576])
def test_fcu_down_rows_of_conformer_widths_split_without_padding(C_out):
    head, tail = row_split(C_out)
    assert head + tail == C_out and head & (head - 1) == 0 and tail & (tail - 1) == 0


def test_fcu_down_reference_pools_before_its_conv():
    """The one PyTorch FCU-down (the model's and the benchmark's) convolves the pooled map: the
    paper's conv-then-pool function, with (grid / map)^2 of its conv FLOPs."""
    torch.manual_seed(0)
    x, weight, bias, grid_hw, ln_w, ln_b, eps = _fp64(_down_args(2, 24, 8, 12, 40, (2, 3),
                                                                  torch.float32))
    with FlopCounterMode(display=False) as counter:
        got = fcu_down_reference(x, weight, bias, grid_hw, ln_w, ln_b, eps)
    assert counter.get_total_flops() == 2 * 2 * 6 * 24 * 40  # B * tokens * C_in * C_out MACs
    conv_first = F.adaptive_avg_pool2d(F.conv2d(x, weight, bias), grid_hw)
    want = F.gelu(F.layer_norm(conv_first.flatten(2).transpose(1, 2), (40,), ln_w, ln_b, eps))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize('autocast', [True, False], ids=['autocast-fp16', 'fp16-x-fp32-weight'])
def test_fcu_kernels_cast_fp32_weights_to_the_compute_dtype(autocast):
    """Mixed precision: fp32 conv weights meet fp16 activations (or fp16 autocast), and the
    kernels still run, in fp16, instead of refusing the dtypes."""
    torch.manual_seed(0)

    def half(args, i):
        return [a.half() if j in i else a for j, a in enumerate(args)]

    down = _down_args(2, 24, 8, 12, 40, (2, 3), torch.float32)
    up = half(_up_args(2, (3, 5), 40, 24, (9, 15), torch.float32), (7,))  # add_to: a CNN map
    if autocast:
        with torch.autocast('cpu', dtype=torch.float16):
            got_down, got_up = fcu_down(*down, backend='triton'), fcu_up(*up, backend='triton')
    else:
        got_down = fcu_down(*half(down, (0,)), backend='triton')
        got_up = fcu_up(*half(up, (0,)), backend='triton')
    assert got_down.dtype == got_up.dtype == torch.float16
    torch.testing.assert_close(got_down.double(), fcu_down_reference(*_fp64(half(down, (0, 1)))),
                               **TOL[torch.float16])
    torch.testing.assert_close(got_up.double(), fcu_up_reference(*_fp64(half(up, (0, 2, 7)))),
                               **TOL[torch.float16])


@pytest.fixture
def cuda_layer_norm_autocast():
    """CPU autocast that runs LayerNorm in fp32, as CUDA autocast does (CPU autocast keeps the
    16-bit dtype), so the dtype the kernels meet on a GPU is reachable without one."""
    def layer_norm_fp32(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
        with torch.autocast('cpu', enabled=False):
            return F.layer_norm(x.float(), normalized_shape, *(
                None if p is None else p.float() for p in (weight, bias)), eps)

    override = torch.library.Library('aten', 'IMPL')
    override.impl('layer_norm', layer_norm_fp32, 'AutocastCPU')
    yield
    del override  # its finalizer removes the kernel, and no later test may see it
    with torch.autocast('cpu', dtype=torch.float16):
        assert F.layer_norm(torch.ones(1, 2, dtype=torch.float16), (2,)).dtype == torch.float16


def test_fcu_down_returns_the_dtype_its_reference_returns_under_cuda_autocast(
        cuda_layer_norm_autocast):
    """The reference's LayerNorm makes its tokens fp32 under CUDA autocast; the kernel computes
    in fp16 there and must still hand back fp32 tokens, not a second rounding to fp16."""
    torch.manual_seed(0)
    down = _down_args(2, 24, 8, 12, 40, (2, 3), torch.float32)
    with torch.autocast('cpu', dtype=torch.float16):
        got, want = fcu_down(*down, backend='triton'), fcu_down_reference(*down)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[torch.float16])

