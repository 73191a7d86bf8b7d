"""Conformer's hot ops, each with one PyTorch reference beside its Triton kernel or oneDNN call.

Public ops: :func:`attention` (fused multi-head attention, forward and backward),
:func:`conv_bn_act` (conv + folded BatchNorm + residual + ReLU), :func:`fcu_down` /
:func:`fcu_up` (Conformer's feature-coupling units) and :func:`linear` (+ GELU). Every op takes
``backend=`` ('auto' | 'triton' | 'torch' | 'onednn'); the default comes from
:func:`set_backend` or the :func:`use_backend` context manager, and
:func:`.backend.dispatch` is the only place that picks an implementation.
"""

from .backend import BACKENDS, get_backend, set_backend, use_backend
from .conv import conv_bn_act
from .fcu import fcu_down, fcu_up
from .flash_attention import attention
from .linear import linear

__all__ = ['BACKENDS', 'attention', 'conv_bn_act', 'fcu_down', 'fcu_up', 'get_backend', 'linear',
           'set_backend', 'use_backend']
