"""oneDNN implementations of :func:`.conv_bn_act` and :func:`.linear` for CPU inference.

PyTorch's CPU convolution reorders its plain weight into oneDNN's blocked layout on every call
(a pass over the whole weight, which at batch 1 comes from DRAM), and PyTorch sends fp32
linears to MKL, whose fast paths are Intel-only. These run oneDNN's convolution and inner
product on a copy of the weight packed once, with the ReLU, residual add or exact GELU that
follows done in the same call. The packed copy is cached beside the weight tensor (weakly, so
it goes with it) and rebuilt whenever the weight is replaced or written to, the folded scale
changes, or, for convolutions, the input shape does.

Inference only: :func:`.backend.dispatch` sends calls that need autograd to PyTorch. Under
torch.compile, convolutions are left to inductor, whose freezing packs weights itself, and
fp32 linears run as the custom op ``conformer::onednn_linear`` on the plain weight (freezing
makes it a constant); bf16 linears are left to inductor too.
"""

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ['conv_bn_act', 'conv_limit', 'linear', 'linear_limit', 'takes_dtype']

_packed = WeakIdKeyDictionary()  # weight -> (key, scale or None, packed weight)


@torch.compiler.assume_constant_result  # torch.compile would graph-break at every op otherwise
def takes_dtype(dtype):
    """Whether oneDNN's convolution and inner product take ``dtype`` on this CPU: fp32 wherever
    PyTorch has oneDNN, bf16 where oneDNN has a bf16 path, natively or emulated on AVX-512
    (:func:`conformer.runtime.native_bf16` tells the two apart; elsewhere it refuses to pack).

    Args:
        dtype: the torch dtype to check.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _dtype_limit(x, weight):
    if x.dtype != weight.dtype:
        return f'x and weight must share one dtype (got {x.dtype} and {weight.dtype})'
    if not takes_dtype(x.dtype):
        return f'oneDNN does not take {x.dtype} on this CPU'
    return None


def _equal(a, b):
    """Whether two optional tensors are both None or equal."""
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def _packed_weight(weight, layout_key, pack, scale=None):
    """``pack(weight scaled per output channel)``, cached until the weight, the scale's values
    or ``layout_key`` change."""
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape, layout_key)
    cached = _packed.get(weight)
    if cached is None or cached[0] != key or not _equal(cached[1], scale):
        scaled = weight if scale is None else (
            weight.float() * scale.float().view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
        cached = (key, None if scale is None else scale.clone(), pack(scaled.detach()))
        _packed[weight] = cached
    return cached[2]


def conv_limit(x, weight):
    """None if :func:`conv_bn_act` takes these inputs, else the reason.

    Args:
        x: the conv input.
        weight: the conv weight.
    """
    if torch.compiler.is_compiling():
        return 'under torch.compile, inductor packs convolution weights itself'
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        return 'x and weight must be 4-D with matching channels (groups 1)'
    if weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        return 'the kernel must be square with an odd size (padding k // 2)'
    return _dtype_limit(x, weight)


def conv_bn_act(x, weight, scale, shift, stride=1, residual=None, relu=True):
    """:func:`.conv_bn_act` by oneDNN: the scale is folded into the packed weight and the shift
    is the convolution's bias. The output is channels_last.

    Args:
        x: input (B, C_in, H, W), fp32 or bf16 on the CPU.
        weight: conv weight (C_out, C_in, k, k), k odd, of x's dtype.
        scale: (C_out,) per-channel multiplier from the folded BatchNorm.
        shift: (C_out,) per-channel offset from the folded BatchNorm.
        stride: conv stride; padding is k // 2.
        residual: (B, C_out, Ho, Wo) added before the ReLU, or None.
        relu: apply ReLU to the result.
    """
    padding = [weight.shape[-1] // 2] * 2
    geometry = (padding, [stride, stride], [1, 1], 1)
    packed = _packed_weight(
        weight, (tuple(x.shape), stride),
        lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape)),
        scale)
    bias, unary = shift.to(x.dtype), 'relu' if relu else 'none'
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, unary, [], '')
    residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, packed, bias, *geometry, 'add', 1.0, unary, [], '')


def linear_limit(x, weight):
    """None if :func:`linear` takes these inputs, else the reason.

    Args:
        x: the linear's input.
        weight: the linear's weight.
    """
    if torch.compiler.is_compiling() and x.dtype == torch.bfloat16:
        return 'under torch.compile, inductor packs bf16 linear weights itself'
    return _dtype_limit(x, weight)


def _linear_pointwise(x, weight, bias, gelu):
    attr, algorithm = ('gelu', 'none') if gelu else ('none', '')
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


@torch.library.custom_op('conformer::onednn_linear', mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   gelu: bool) -> torch.Tensor:
    """A custom op so that torch.compile calls oneDNN as is: inductor's own Linear passes
    would otherwise pattern-match ``mkldnn._linear_pointwise`` and expect weights they packed
    themselves."""
    return _linear_pointwise(x, weight, bias, gelu)


@_onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x, weight, bias=None, gelu=False):
    """:func:`.linear` by oneDNN's inner product on the packed weight (compiled: on the plain
    weight, through the custom op).

    Args:
        x: (..., in_features), fp32 or bf16 on the CPU.
        weight: (out_features, in_features), of x's dtype.
        bias: (out_features,) or None.
        gelu: apply the exact (erf) GELU to the result.
    """
    if torch.compiler.is_compiling():
        return _onednn_linear(x, weight, bias, gelu)
    # a direct call also skips the custom op's dispatch (tens of microseconds a call)
    packed = _packed_weight(weight, (),
                            lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
    return _linear_pointwise(x, packed, bias, gelu)
