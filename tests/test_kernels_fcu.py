"""Fused feature-coupling units (Triton, interpreted on CPU) against the PyTorch path.

The reference runs in fp32 on the same (rounded) inputs. Tolerances: fp32 1e-4 abs + 1e-4 rel
(FCU-down pools before its 1x1 conv, a reordering of the same sums); fp16 1e-2 abs + 1e-2 rel
(16-bit GEMM inputs, LayerNorm-scaled outputs of magnitude ~3, one fp16 rounding).
"""

import pytest
import torch

from conformer.kernels import fcu_down, fcu_up
from conformer.kernels.fcu import fcu_down_reference, fcu_up_reference

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


def _down_args(B, C_in, H, W, C_out, grid_hw, dtype):
    x = torch.randn(B, C_in, H, W, dtype=dtype)
    weight = (torch.randn(C_out, C_in, 1, 1) / C_in**0.5).to(dtype)
    bias, ln_bias = torch.randn(C_out, dtype=dtype), torch.randn(C_out, dtype=dtype)
    ln_weight = (torch.rand(C_out) + 0.5).to(dtype)
    return x, weight, bias, grid_hw, ln_weight, ln_bias, 1e-6


def _up_args(B, grid_hw, C_in, C_out, out_hw, dtype, channels_last=False):
    tokens = torch.randn(B, grid_hw[0] * grid_hw[1], C_in, dtype=dtype)
    weight = (torch.randn(C_out, C_in, 1, 1) / C_in**0.5).to(dtype)
    bias, scale, shift = torch.randn(C_out, dtype=dtype), torch.rand(C_out) + 0.5, torch.randn(C_out)
    add_to = torch.randn(B, C_out, *out_hw, dtype=dtype)
    if channels_last:
        add_to = add_to.to(memory_format=torch.channels_last)
    return tokens, grid_hw, weight, bias, scale, shift, out_hw, add_to


def _fp32(args):
    return [a.float() if isinstance(a, torch.Tensor) else a for a in args]


@DTYPES
@pytest.mark.parametrize("B, C_in, H, W, C_out, grid_hw", [
    (3, 24, 8, 12, 40, (2, 3)),  # dw_stride 4, non-square grid
    (1, 40, 7, 9, 24, (7, 9)),  # dw_stride 1 (Conformer's last stage), odd sizes
], ids=["dw4", "dw1-odd"])
def test_fcu_down_matches_reference(B, C_in, H, W, C_out, grid_hw, dtype):
    torch.manual_seed(0)
    args = _down_args(B, C_in, H, W, C_out, grid_hw, dtype)
    out = fcu_down(*args, backend="triton")
    assert out.shape == (B, grid_hw[0] * grid_hw[1], C_out) and out.dtype == dtype
    torch.testing.assert_close(out.float(), fcu_down_reference(*_fp32(args)), **TOL[dtype])


@DTYPES
@pytest.mark.parametrize("B, grid_hw, C_in, C_out, out_hw, channels_last", [
    (3, (3, 5), 40, 24, (9, 15), False),  # up_stride 3: nearest must match F.interpolate exactly
    (1, (7, 9), 24, 40, (14, 18), True),
], ids=["x3", "x2-odd-nhwc"])
def test_fcu_up_matches_reference(B, grid_hw, C_in, C_out, out_hw, channels_last, dtype):
    torch.manual_seed(0)
    args = _up_args(B, grid_hw, C_in, C_out, out_hw, dtype, channels_last)
    out = fcu_up(*args, backend="triton")
    assert out.shape == args[-1].shape and out.dtype == dtype
    assert out.stride() == args[-1].stride()  # laid out like add_to
    torch.testing.assert_close(out.float(), fcu_up_reference(*_fp32(args)), **TOL[dtype])


def test_fcu_down_uneven_map_uses_adaptive_pooling():
    """13x13 onto a 4x4 grid: 'triton' names the limit, 'auto' runs adaptive pooling."""
    args = _down_args(1, 24, 13, 13, 40, (4, 4), torch.float32)
    with pytest.raises(ValueError, match="multiple of the token grid 4x4"):
        fcu_down(*args, backend="triton")
    x, weight, bias, grid_hw, *ln = args
    conv = torch.nn.functional.conv2d(x, weight, bias)
    pooled = torch.nn.functional.adaptive_avg_pool2d(conv, (4, 4)).flatten(2).transpose(1, 2)
    want = torch.nn.functional.gelu(torch.nn.functional.layer_norm(pooled, (40,), *ln))
    torch.testing.assert_close(fcu_down(*args), want)


def test_fcu_up_uneven_map_falls_back():
    args = _up_args(1, (3, 5), 24, 40, (8, 13), torch.float32)
    with pytest.raises(ValueError, match="map size 8x13 must be a multiple of the token grid 3x5"):
        fcu_up(*args, backend="triton")
    torch.testing.assert_close(fcu_up(*args, backend="auto"), fcu_up_reference(*args))


def test_fcu_up_rejects_class_token():
    tokens, grid_hw, *rest = _up_args(1, (3, 5), 24, 40, (6, 10), torch.float32)
    with_cls = torch.cat([tokens[:, :1], tokens], 1)
    with pytest.raises(ValueError, match="drop the class token"):
        fcu_up(with_cls, grid_hw, *rest)
