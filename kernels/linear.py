"""A linear layer, optionally with the exact GELU that follows it: PyTorch everywhere, oneDNN
on packed weights for CPU inference under the 'onednn' backend (see :mod:`.onednn`)."""

from typing import Optional

import torch
import torch.nn.functional as F

from . import onednn
from .backend import dispatch


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     gelu: bool = False) -> torch.Tensor:
    """The PyTorch path: F.linear, then exact (erf) GELU if ``gelu``.

    Arguments as :func:`linear` (which has ``backend`` besides).
    """
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


def linear(x, weight, bias=None, gelu=False, backend=None):
    """``F.linear(x, weight, bias)``, then exact GELU if ``gelu``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        gelu: apply the exact (erf) GELU to the result.
        backend: overrides the default backend (see :mod:`conformer.kernels.backend`).
    """
    if dispatch('linear', backend, (x, weight, bias),
                onednn_limit=lambda: onednn.linear_limit(x, weight)) == 'onednn':
        return onednn.linear(x, weight, bias, gelu)
    return linear_reference(x, weight, bias, gelu)
