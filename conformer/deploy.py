"""One-call inference deployment: :func:`optimize_for_inference`.

What it does to a (copy of a) Conformer, and why each step is safe:

- eval mode and no autograd: the result is for inference only;
- every BatchNorm that directly follows a convolution (stem ``conv1/bn1``, ConvBlock
  ``conv{1,2,3}/bn{1,2,3}`` and ``residual_conv/residual_bn``, FCU-up ``conv_project/bn``)
  is folded into that convolution's weight and bias, which removes one pass over every CNN
  activation and is exact up to fp32 rounding;
- weights and inputs go channels_last, the layout oneDNN (CPU) and cuDNN run convolutions in
  without reordering;
- attention already runs through ``F.scaled_dot_product_attention`` (fused kernels);
- on CPU every Linear runs through oneDNN's inner product on a pre-packed weight
  (:class:`OneDNNLinear`), with the MLP's GELU fused into its first Linear. PyTorch sends
  fp32 linears to MKL, whose fast paths are Intel-only: on the 2-core AMD Zen 5 here MKL's
  fp32 GEMM runs at ~210 GFLOP/s and oneDNN's at ~480 (``tools/benchmark.py`` times both
  routes for its "% of peak"). Compiled bf16 models keep plain Linears for inductor to pack;
- on CPU, eager convolutions run on a weight packed once for the input shape
  (:class:`OneDNNConv2d`) instead of one PyTorch reorders on every call, with the ReLU that
  follows each and the ConvBlock's residual add done in the same oneDNN call;
- optionally ``torch.compile`` with inductor freezing (weights become constants, so the
  folded/cast weights are prepared once and kernels are fused around them);
- optionally bfloat16 (``dtype=torch.bfloat16``). Eager, the weights are cast to bf16
  once, up front, and inputs on each call, so every activation is bf16; PyTorch's LayerNorm
  and softmax kernels still accumulate in fp32 and round only their outputs. Autocast, by
  contrast, keeps norms, the residual stream and softmax outputs in fp32 and converts them
  back for every matmul: the pure-bf16 model is 5% faster on Conformer-S at batch 1 and 3%
  at batch 8 on an AVX-512 Zen 4 and agrees with fp32 on as many top-1 predictions (99.8% of
  Fashion-MNIST's test set, for a nano model trained on it, as with autocast). Compiled,
  it is the other way round: inductor fuses autocast's casts into its kernels, and the
  autocast graph (conv and linear weights stored in bf16, so no call re-casts them) takes
  66 ms at batch 1 there, the pure-bf16 one 75. On a device without native bf16
  (:func:`conformer.runtime.native_bf16`; AVX2-only CPUs such as AMD Zen 3) it still runs,
  emulated and slower than fp32, with a warning.

The returned :class:`InferenceModel` answers ``model(x)``, ``forward_features``,
``forward_head`` and ``forward_intermediates`` like the original, returns fp32 tensors in
every mode, and forwards every other attribute (``num_classes``, ``pretrained_cfg``,
``feature_info``...) to the wrapped model.

Documented tolerances against the eager fp32 model (tests/test_deploy.py checks them):

- ``dtype=torch.float32`` (with or without compile): logits within 1e-4 (absolute);
- ``dtype=torch.bfloat16``: the same top-1 class on at least 99% of a real evaluation set
  (logits themselves differ by bf16 rounding, ~1e-2 relative).
"""
import copy
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_map
from timm.layers import Mlp

from conformer import runtime
from conformer.layers.blocks import ConvBlock

__all__ = ['FusedConvBlock', 'InferenceModel', 'OneDNNConv2d', 'OneDNNLinear', 'PackedWeight',
           'fold_batchnorm', 'fuse_conv_relus', 'onednn_runs', 'optimize_for_inference',
           'use_onednn_convs', 'use_onednn_linears']

# (conv, bn, act) attribute names where the BN is applied straight to the conv's output and
# the act (None: there is none), when it is a ReLU, to the BN's; ConvBlock's conv3/bn3/act3
# has its residual add between BN and ReLU (FusedConvBlock fuses both)
CONV_BN_ACTS = (
    ('conv1', 'bn1', 'act1'), ('conv2', 'bn2', 'act2'), ('conv3', 'bn3', 'act3'),
    ('residual_conv', 'residual_bn', None), ('conv_project', 'bn', 'act'),
)
DTYPES = (torch.float32, torch.bfloat16)
# the methods that take images (or features) and are run in the deployed dtype and layout
WRAPPED_METHODS = ('forward', 'forward_features', 'forward_head', 'forward_intermediates')


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d it follows (see ``CONV_BN_ACTS``), in place.

    The model must be in eval mode (the fold uses the running statistics). The BN is replaced
    by ``nn.Identity`` so the forward code runs unchanged. Returns the number of folds.
    """
    if model.training:
        raise ValueError('fold_batchnorm needs an eval-mode model (it folds the running '
                         'statistics); call model.eval() first')
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name, _ in CONV_BN_ACTS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


def _linear_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      fuse_gelu: bool) -> torch.Tensor:
    attr, algorithm = ('gelu', 'none') if fuse_gelu else ('none', '')
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


@torch.library.custom_op('conformer::onednn_linear', mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  fuse_gelu: bool) -> torch.Tensor:
    """``F.linear`` (then exact GELU if ``fuse_gelu``) by oneDNN's inner product.

    A custom op so torch.compile calls it as is: inductor's own Linear passes would otherwise
    pattern-match ``mkldnn._linear_pointwise`` and expect weights they packed themselves.
    """
    return _linear_pointwise(x, weight, bias, fuse_gelu)


@onednn_linear.register_fake
def _onednn_linear_shape(x, weight, bias, fuse_gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class PackedWeight:
    """Mixin for a layer whose eager CPU calls read a copy of ``self.weight`` in oneDNN's
    blocked layout, so oneDNN does not reorder the weight on every call (a pass over all of
    it, which at batch 1 comes from DRAM).

    The copy is made on first use and again whenever the weight is replaced or written to
    (``load_state_dict``) or ``layout_key`` changes. An opaque oneDNN tensor can be neither
    copied nor pickled, so copies and pickles drop it and rebuild it on use.
    """
    _packed: Optional[Tuple[tuple, torch.Tensor]] = None  # (key, packed weight)

    def packed_weight(self, pack: Callable[[torch.Tensor], torch.Tensor],
                      layout_key: tuple = ()) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w.dtype, w.shape, w._version, layout_key)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack(w.detach()))
        return self._packed[1]

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _packed=None)


class OneDNNLinear(PackedWeight, nn.Module):
    """An inference-only ``nn.Linear`` run by oneDNN, optionally with GELU (erf) fused into it.

    Keeps the Linear's ``weight`` and ``bias`` parameters, so state_dict keys are unchanged.
    Eager CPU calls use a packed weight (:class:`PackedWeight`): 4-17% faster than the plain
    weight in fp32 and 20-40% in bf16 on Conformer-S's shapes on a Zen 5. Under torch.compile
    it calls :func:`onednn_linear` on the plain weight, which freezing makes a constant. The
    input is cast to the weight's dtype (autocast does not reach these ops). Moved off the
    CPU (``.to('cuda')``), it runs ``F.linear`` and ``F.gelu`` instead.
    """

    def __init__(self, linear: nn.Linear, fuse_gelu: bool = False):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.fuse_gelu = fuse_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if x.device.type == 'cpu':
            if torch.compiler.is_compiling():
                return onednn_linear(x, self.weight, self.bias, self.fuse_gelu)
            # a direct call also skips the custom op's dispatch (~60 us a call)
            weight = self.packed_weight(lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
            return _linear_pointwise(x, weight, self.bias, self.fuse_gelu)
        x = F.linear(x, self.weight, self.bias)
        return F.gelu(x) if self.fuse_gelu else x

    def extra_repr(self) -> str:
        return (f'in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, '
                f'bias={self.bias is not None}, fuse_gelu={self.fuse_gelu}')


class OneDNNConv2d(PackedWeight, nn.Conv2d):
    """An inference-only ``nn.Conv2d`` whose eager CPU calls run oneDNN's convolution on a
    weight packed for the input's shape (:class:`PackedWeight`; a new shape repacks), with an
    optional residual ``add`` and ReLU (``fuse_relu``) done in the same call:
    ``relu(conv(x) + add)``.

    PyTorch's own CPU convolution reorders the plain weight into oneDNN's layout on every
    call; packing once makes the fp32 deploy of Conformer-S 4% faster at batch 1 and 2% at
    batch 8 on an AVX2 Zen 3, and the bf16 deploy 6% and 5% on an AVX-512 Zen 4. Its output
    is channels_last whatever the input's layout. Still an ``nn.Conv2d`` (same attributes,
    parameters and state_dict keys, and ``isinstance`` checks hold); under torch.compile,
    whose freezing packs weights itself, and off the CPU it runs the plain PyTorch ops.
    """

    def __init__(self, conv: nn.Conv2d, fuse_relu: bool = False):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         device='meta')
        self.weight, self.bias = conv.weight, conv.bias
        self.fuse_relu = fuse_relu

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        onednn = x.device.type == 'cpu' and not torch.compiler.is_compiling()
        # for grouped convs PyTorch does a fused add+ReLU with an op that has no bf16
        if onednn and (add is None or self.groups == 1):
            return self._onednn_call(x, add, 'relu' if self.fuse_relu else 'none')
        y = self._onednn_call(x, None, 'none') if onednn else super().forward(x)
        y = y if add is None else y + add
        return F.relu(y) if self.fuse_relu else y

    def _onednn_call(self, x: torch.Tensor, add: Optional[torch.Tensor],
                     unary: str) -> torch.Tensor:
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        weight = self.packed_weight(
            lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape)),
            layout_key=tuple(x.shape))
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry,
                                                           unary, [], '')
        add = add.to(x.dtype).contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, weight, self.bias, *geometry, 'add', 1.0, unary, [], '')

    def extra_repr(self) -> str:
        return super().extra_repr() + f', fuse_relu={self.fuse_relu}'


class FusedConvBlock(ConvBlock):
    """A deployed :class:`ConvBlock` whose last conv (a :class:`OneDNNConv2d` with the ReLU
    fused) adds the shortcut in its own call, saving two passes over the block's output."""

    def project(self, x2: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return self.conv3(x2, add=shortcut)


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's inner product and convolution take ``dtype`` on this CPU: fp32
    wherever PyTorch has oneDNN, bf16 only with native bf16 (elsewhere oneDNN refuses to pack
    bf16 weights)."""
    return torch.backends.mkldnn.is_available() and (
        dtype != torch.bfloat16 or runtime.native_bf16(torch.device('cpu')))


def use_onednn_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of an eval-mode CPU model by a :class:`OneDNNLinear`, in
    place, fusing the exact GELU of each timm ``Mlp`` into its ``fc1``. Returns the number of
    Linears replaced; those whose dtype oneDNN does not take here (:func:`onednn_runs`) stay."""
    def runs(linear: nn.Module) -> bool:
        return type(linear) is nn.Linear and onednn_runs(linear.weight.dtype)

    replaced = 0
    for module in list(model.modules()):
        if isinstance(module, Mlp) and runs(module.fc1) and \
                type(module.act) is nn.GELU and module.act.approximate == 'none':
            module.fc1, module.act = OneDNNLinear(module.fc1, fuse_gelu=True), nn.Identity()
            replaced += 1
        for name, child in list(module.named_children()):
            if runs(child):
                setattr(module, name, OneDNNLinear(child))
                replaced += 1
    return replaced


def use_onednn_convs(model: nn.Module) -> int:
    """Replace every ``nn.Conv2d`` of an eval-mode CPU model by a :class:`OneDNNConv2d`, in
    place; returns how many. Convolutions with a ``padding_mode`` other than zeros or a string
    padding stay, and so do those whose dtype oneDNN does not take here (:func:`onednn_runs`)."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d and onednn_runs(child.weight.dtype) and \
                    child.padding_mode == 'zeros' and not isinstance(child.padding, str):
                setattr(module, name, OneDNNConv2d(child))
                replaced += 1
    return replaced


def fuse_conv_relus(model: nn.Module) -> int:
    """Fold each ReLU that directly follows a (BN-folded) :class:`OneDNNConv2d` into it, and
    each :class:`ConvBlock`'s residual add and final ReLU into its last conv, in place.

    Run after :func:`fold_batchnorm` and :func:`use_onednn_convs`. A fused ReLU becomes
    ``nn.Identity``, so the forward code runs unchanged. Returns the number of ReLUs fused.
    """
    fused = 0
    for module in list(model.modules()):
        for conv_name, bn_name, act_name in CONV_BN_ACTS:
            if act_name is None:
                continue
            conv, bn, act = (getattr(module, name, None) for name in (conv_name, bn_name, act_name))
            if isinstance(conv, OneDNNConv2d) and isinstance(bn, nn.Identity) and \
                    type(act) is nn.ReLU:
                conv.fuse_relu = True
                setattr(module, act_name, nn.Identity())
                fused += 1
                if conv_name == 'conv3' and type(module) is ConvBlock:
                    module.__class__ = FusedConvBlock  # act3 follows the add: fuse both
    return fused


class InferenceModel(nn.Module):
    """A deployed model: same methods as the wrapped Conformer, run without autograd in the
    chosen dtype and channels_last layout, optionally through ``torch.compile``.

    Each wrapped method is compiled on its first call (``dynamic=False``: once per input
    shape, so feed fixed-size batches when serving; torch.compile falls back to eager after
    its recompile limit).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32,
                 compile: bool = False, compile_mode: Optional[str] = None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.compile = compile
        self.compile_mode = compile_mode
        self._compiled: Dict[str, Callable] = {}
        # compiled bf16 runs under autocast, eager bf16 as a pure-bf16 model (module docstring)
        self.autocast = compile and dtype == torch.bfloat16

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == 'model':  # not set yet (inside __init__)
                raise
            return getattr(self.model, name)

    def _call(self, name: str, *args, **kwargs):
        fn = getattr(self.model, name)
        if self.compile:
            if name not in self._compiled:
                self._compiled[name] = torch.compile(fn, mode=self.compile_mode, dynamic=False)
            fn = self._compiled[name]
        args = tree_map(self._to_deployed, args)
        device_type = next(self.model.parameters()).device.type
        # freezing is read when a call triggers a compile; patching it per call keeps the
        # process-wide inductor config untouched
        with torch.no_grad(), inductor_config.patch(freezing=True), \
                torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            out = fn(*args, **kwargs)
        return tree_map(_to_float32, out)

    def _to_deployed(self, x: Any) -> Any:
        """A floating input in the deployed dtype, and channels_last if it is a batch of maps."""
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            return x
        x = x.to(torch.float32 if self.autocast else self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def forward(self, x: torch.Tensor):
        return self._call('forward', x)

    def forward_features(self, x: torch.Tensor):
        return self._call('forward_features', x)

    def forward_head(self, features, pre_logits: bool = False):
        return self._call('forward_head', features, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, **kwargs):
        return self._call('forward_intermediates', x, **kwargs)

    def train(self, mode: bool = True) -> 'InferenceModel':
        if mode:
            raise RuntimeError('an InferenceModel is for inference only (its BatchNorms are '
                               'folded); train the original model instead')
        return super().train(False)


def _to_float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return x


def optimize_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32,
                           compile: bool = False,
                           compile_mode: Optional[str] = None) -> InferenceModel:
    """Return an inference-only copy of ``model`` with BatchNorm folded, channels_last
    weights, and optionally bf16 weights and activations (``dtype=torch.bfloat16``) and
    ``torch.compile`` (``compile=True``, with inductor freezing; ``compile_mode`` is passed to
    torch.compile, e.g. ``'max-autotune-no-cudagraphs'``, which tunes GEMM kernels but
    compiles far longer).

    The original model is not modified. See the module docstring for tolerances.
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be torch.float32 or torch.bfloat16, got {dtype}; '
                         f'float16 has no fast CPU path and is not a deploy target')
    if isinstance(model, InferenceModel):
        raise ValueError('model is already an InferenceModel; pass the original model')
    device = next(model.parameters()).device
    if dtype == torch.bfloat16 and not runtime.native_bf16(device):
        warnings.warn(f'bf16 deploy on a {device.type} without native bf16: PyTorch emulates '
                      f'it, several times slower than fp32; deploy with dtype=torch.float32',
                      stacklevel=2)
    deployed = copy.deepcopy(model).eval()
    fold_batchnorm(deployed)
    deployed = deployed.to(memory_format=torch.channels_last)
    if dtype == torch.bfloat16 and compile:  # autocast (see the module docstring)
        for module in deployed.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(torch.bfloat16)
    else:
        deployed = deployed.to(dtype)
    # compiled bf16 is left to inductor, whose freezing packs bf16 linears for oneDNN itself
    # (fp32 ones it gives to MKL, the slow route on AMD CPUs)
    if device.type == 'cpu' and not (compile and dtype == torch.bfloat16):
        use_onednn_linears(deployed)
    if device.type == 'cpu' and not compile:  # inductor's freezing packs convolutions itself
        use_onednn_convs(deployed)
        fuse_conv_relus(deployed)
    for p in deployed.parameters():
        p.requires_grad_(False)
    return InferenceModel(deployed, dtype=dtype, compile=compile,
                          compile_mode=compile_mode).eval()
