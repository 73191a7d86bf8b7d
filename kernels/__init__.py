"""Triton kernels for Conformer's hot path, each beside a pure-PyTorch reference.

Public ops: :func:`attention` (fused multi-head attention, forward and backward),
:func:`conv_bn_act` (implicit-GEMM conv + folded BatchNorm + residual + ReLU),
:func:`fcu_down` / :func:`fcu_up` (Conformer's feature-coupling units). Every op takes
``backend=`` ("auto" | "triton" | "torch"); the default comes from :func:`set_backend` or the
:func:`use_backend` context manager, and :mod:`.backend` is the only place that picks a path.
"""

from .backend import BACKENDS, get_backend, prefers_triton, set_backend, use_backend
from .conv import conv_bn_act
from .fcu import fcu_down, fcu_up
from .flash_attention import attention

__all__ = ["BACKENDS", "attention", "conv_bn_act", "fcu_down", "fcu_up", "get_backend", "prefers_triton",
           "set_backend", "use_backend"]
