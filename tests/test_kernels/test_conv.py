"""Fused conv + folded BN + residual + ReLU (Triton, interpreted on CPU) against the PyTorch path.

The reference runs in fp64 on the same (rounded) inputs. Tolerances: fp32 (IEEE dots; the
interpreter does not emulate TF32) 2e-5 abs + 2e-5 rel; fp16 1e-2 abs + 1e-2 rel (16-bit
products over up to 9*40 terms, fp32 accumulation, one fp16 rounding of outputs of magnitude
~10).
"""

import pytest
import torch

from conformer.kernels import conv_bn_act
from conformer.kernels.conv import conv_bn_act_reference

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
FP16 = torch.float16


@pytest.mark.parametrize('B, C_in, C_out, H, W, k, stride, residual, relu, dtype, channels_last', [
    (3, 40, 24, 7, 9, 3, 1, True, True, torch.float32, False),
    (1, 24, 40, 13, 13, 3, 2, False, True, FP16, False),
    (3, 24, 40, 13, 13, 1, 2, True, True, FP16, True),
    (1, 40, 24, 7, 9, 1, 1, False, False, torch.float32, True),
], ids=['3x3-s1-res-fp32', '3x3-s2-fp16', '1x1-s2-res-fp16-nhwc', '1x1-s1-norelu-fp32-nhwc'])
def test_conv_bn_act_matches_reference(B, C_in, C_out, H, W, k, stride, residual, relu, dtype,
                                       channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(B, C_in, H, W, dtype=dtype).to(memory_format=fmt)
    weight = (torch.randn(C_out, C_in, k, k) / (C_in * k * k) ** 0.5).to(dtype)
    scale, shift = torch.rand(C_out) + 0.5, torch.randn(C_out)  # a folded BatchNorm, fp32
    H_out, W_out = (H - 1) // stride + 1, (W - 1) // stride + 1
    # NCHW: any layout works
    res = torch.randn(B, C_out, H_out, W_out, dtype=dtype) if residual else None

    out = conv_bn_act(x, weight, scale, shift, stride, res, relu, backend='triton')

    assert out.shape == (B, C_out, H_out, W_out) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = conv_bn_act_reference(x.double(), weight.double(), scale.double(), shift.double(),
                                 stride, None if res is None else res.double(), relu)
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_conv_bn_act_falls_back_to_pytorch_for_gradients():
    """The Triton path is inference-only: with autograd on, 'triton' still runs PyTorch."""
    x = torch.randn(1, 24, 7, 9)
    weight = torch.randn(40, 24, 3, 3, requires_grad=True)
    out = conv_bn_act(x, weight, torch.ones(40), torch.zeros(40), backend='triton')
    out.sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize('autocast', [True, False], ids=['autocast-fp16', 'fp16-x-fp32-weight'])
def test_conv_bn_act_casts_fp32_weights_to_the_compute_dtype(autocast):
    """Mixed precision: fp32 weights meet fp16 activations (or fp16 autocast), and the kernel
    still runs, in fp16, instead of refusing the dtypes (which made 'auto' run PyTorch)."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, 7, 9)
    weight = torch.randn(40, 24, 3, 3) / (24 * 9) ** 0.5
    scale, shift = torch.rand(40) + 0.5, torch.randn(40)
    if autocast:
        with torch.autocast('cpu', dtype=FP16):
            out = conv_bn_act(x, weight, scale, shift, backend='triton')
    else:
        out = conv_bn_act(x.half(), weight, scale, shift, backend='triton')
    assert out.dtype == FP16
    want = conv_bn_act_reference(x.half().double(), weight.half().double(), scale.double(),
                                 shift.double())
    torch.testing.assert_close(out.double(), want, **TOL[FP16])
