"""One-call inference deployment: :func:`optimize_for_inference`.

What it does to a (copy of a) Conformer, and why each step is safe:

- eval mode and no autograd: the result is for inference only;
- every BatchNorm that directly follows a convolution (stem ``conv1/bn1``, ConvBlock
  ``conv{1,2,3}/bn{1,2,3}`` and ``residual_conv/residual_bn``, FCU-up ``conv_project/bn``)
  is folded into that convolution's weight and bias, which removes one pass over every CNN
  activation and is exact up to fp32 rounding;
- weights and inputs go channels_last, the layout oneDNN (CPU) and cuDNN run convolutions in
  without reordering;
- the model's kernels use the ``'onednn'`` backend (:mod:`conformer.kernels.backend`): on CPU
  the blocks' convolutions and linears run oneDNN on weights packed once, with the ReLU, the
  residual add and the MLP's GELU in the same call (:mod:`conformer.kernels.onednn`), where
  PyTorch would reorder each convolution weight on every call and give fp32 linears to MKL,
  whose fast paths are Intel-only; off the CPU the ops pick as under ``'auto'``;
- optionally ``torch.compile`` with inductor freezing (weights become constants, so the
  folded/cast weights are prepared once and kernels are fused around them; inductor packs
  the convolutions itself) and, on the CPU, inductor's C++ wrapper, which calls the kernels
  one after another without returning to Python between them (a per-call saving that
  matters at batch 1, paid for with a longer first compile);
- optionally bfloat16 (``dtype=torch.bfloat16``). Eager, the weights are cast to bf16
  once, up front, and inputs on each call, so every activation is bf16; PyTorch's LayerNorm
  and softmax kernels still accumulate in fp32 and round only their outputs. Autocast, by
  contrast, keeps norms, the residual stream and softmax outputs in fp32 and converts them
  back for every matmul, which costs time eager; compiled, inductor fuses those casts into
  its kernels, so a compiled bf16 deploy runs under autocast with conv and linear weights
  stored in bf16 (and leaves its linears to inductor, which packs bf16 ones for oneDNN).
  On a device without native bf16 (:func:`conformer.runtime.native_bf16`; CPUs such as
  AMD Zen 3 or Intel Ice Lake) it still runs, emulated and slower than fp32, with a warning.

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
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_map

from conformer import runtime

__all__ = ['InferenceModel', 'fold_batchnorm', 'optimize_for_inference']

# (conv, bn) attribute names where the BN is applied straight to the conv's output
CONV_BNS = (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3'),
            ('residual_conv', 'residual_bn'), ('conv_project', 'bn'))
DTYPES = (torch.float32, torch.bfloat16)
# the methods that take images (or features) and are run in the deployed dtype and layout
WRAPPED_METHODS = ('forward', 'forward_features', 'forward_head', 'forward_intermediates')


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d it follows (see ``CONV_BNS``), in place.

    The BN is replaced by ``nn.Identity`` so the forward code runs unchanged.

    Args:
        model: an eval-mode model (the fold uses the running statistics).

    Returns:
        The number of folds.
    """
    if model.training:
        raise ValueError('fold_batchnorm needs an eval-mode model (it folds the running '
                         'statistics); call model.eval() first')
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in CONV_BNS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


class InferenceModel(nn.Module):
    """A deployed model: same methods as the wrapped Conformer, run without autograd in the
    chosen dtype and channels_last layout, optionally through ``torch.compile``.

    Each wrapped method is compiled on its first call (``dynamic=False``: once per input
    shape, so feed fixed-size batches when serving; torch.compile falls back to eager after
    its recompile limit).

    Args:
        model: the prepared model to wrap (`optimize_for_inference` builds it).
        dtype: torch.float32 or torch.bfloat16; floating inputs are cast to it.
        compile: run each method through ``torch.compile`` with inductor freezing.
        compile_mode: passed to torch.compile.
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
        # freezing and the wrapper are read when a call triggers a compile; patching them per
        # call keeps the process-wide inductor config untouched. On the CPU the compiled graph
        # calls its kernels from C++, not Python: less time between kernels at small batches
        with torch.no_grad(), \
                inductor_config.patch(freezing=True, cpp_wrapper=device_type == 'cpu'), \
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
        """The wrapped model's ``forward_features``, outputs in float32.

        Args:
            x: images (B, C, H, W).
        """
        return self._call('forward_features', x)

    def forward_head(self, features, pre_logits: bool = False):
        """The wrapped model's ``forward_head``, outputs in float32.

        Args:
            features: ``forward_features`` output.
            pre_logits: return the pooled features instead of the logits.
        """
        return self._call('forward_head', features, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, **kwargs):
        """The wrapped model's ``forward_intermediates``, outputs in float32.

        Args:
            x: images (B, C, H, W).
            **kwargs: passed to the wrapped model's ``forward_intermediates``.
        """
        return self._call('forward_intermediates', x, **kwargs)

    def train(self, mode: bool = True) -> 'InferenceModel':
        """Only ``train(False)`` (eval mode) is allowed.

        Args:
            mode: must be False.

        Raises:
            RuntimeError: ``mode`` is True.
        """
        if mode:
            raise RuntimeError('an InferenceModel is for inference only (its BatchNorms are '
                               'folded); train the original model instead')
        return super().train(False)


def _to_float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return x


def optimize_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32,
                           compile: Optional[bool] = None, compile_mode: Optional[str] = None,
                           calibration: Any = None,
                           keep_float: Optional[Sequence[str]] = None) -> InferenceModel:
    """Return an inference-only copy of ``model``: BatchNorm folded, channels_last weights,
    the kernels' ``'onednn'`` backend, optionally bf16 and ``torch.compile``; or, with
    ``dtype=torch.int8``, post-training static int8 (:mod:`conformer.deploy.quantize`).

    The original model is not modified. See the module docstring for what each step does and
    the tolerances.

    Args:
        model: a Conformer (a model with ``set_kernel_backend``).
        dtype: torch.float32, torch.bfloat16 for bf16 weights and activations, or
            torch.int8 (convolutions and linears in int8, calibrated on ``calibration``;
            compiled unless compile=False; see :func:`conformer.deploy.quantize.quantize_int8`).
        compile: run each method through ``torch.compile`` with inductor freezing; None
            means True for int8 (which is only fast compiled) and False otherwise.
        compile_mode: passed to torch.compile, e.g. ``'max-autotune-no-cudagraphs'``, which
            tunes GEMM kernels but compiles far longer.
        calibration: int8 only: a few hundred images preprocessed as for evaluation, as a
            folder, a tensor, a dataset or a DataLoader
            (:func:`conformer.deploy.quantize.calibration_images`).
        keep_float: int8 only: module names left in float (default
            :data:`conformer.deploy.quantize.DEFAULT_KEEP_FLOAT`).
    """
    if dtype == torch.int8:
        from conformer.deploy.quantize import DEFAULT_KEEP_FLOAT, quantize_int8
        return quantize_int8(model, calibration, keep_float=DEFAULT_KEEP_FLOAT
                             if keep_float is None else keep_float, compile=compile is not False,
                             compile_mode=compile_mode)
    if calibration is not None or keep_float is not None:
        raise ValueError('calibration and keep_float are for dtype=torch.int8; float deploys '
                         'need no calibration')
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be torch.float32, torch.bfloat16 or torch.int8, got '
                         f'{dtype}; float16 has no fast CPU path and is not a deploy target')
    if isinstance(model, InferenceModel):
        raise ValueError('model is already an InferenceModel; pass the original model')
    device = next(model.parameters()).device
    if dtype == torch.bfloat16 and not runtime.native_bf16(device):
        warnings.warn(f'bf16 deploy on a {device.type} without native bf16: PyTorch emulates '
                      f'it, several times slower than fp32; deploy with dtype=torch.float32',
                      stacklevel=2)
    compile = bool(compile)
    deployed = copy.deepcopy(model).eval()
    fold_batchnorm(deployed)
    deployed = deployed.to(memory_format=torch.channels_last)
    if dtype == torch.bfloat16 and compile:  # autocast (see the module docstring)
        for module in deployed.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(torch.bfloat16)
    else:
        deployed = deployed.to(dtype)
    deployed.set_kernel_backend('onednn')
    for p in deployed.parameters():
        p.requires_grad_(False)
    return InferenceModel(deployed, dtype=dtype, compile=compile,
                          compile_mode=compile_mode).eval()
