"""Deterministic weights and inputs shared by the golden-output generator and its test.

Every tensor is drawn from a generator seeded by its own state_dict key, so any two models
with the same parameter names get the same weights, whichever code built them.
"""
import zlib
from pathlib import Path

import torch

GOLDEN_FILE = Path(__file__).with_name('golden_paper_logits.pt')
# (variant, batch, height, width): ImageNet size for every variant, one non-square size
GOLDEN_CASES = [
    ('conformer_tiny_patch16', 2, 224, 224),
    ('conformer_small_patch16', 2, 224, 224),
    ('conformer_small_patch32', 2, 224, 224),
    ('conformer_base_patch16', 2, 224, 224),
    ('conformer_small_patch16', 1, 160, 256),
]


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def fill_state_dict(state_dict: dict) -> dict:
    """Replace every floating-point tensor with sane, name-seeded random values."""
    out = {}
    for key, t in state_dict.items():
        if not t.is_floating_point():
            out[key] = t.clone()
            continue
        g = _generator(key)
        if key.endswith('running_var'):
            v = torch.rand(t.shape, generator=g) + 0.5
        elif key.endswith('running_mean') or key.endswith('bias'):
            v = torch.randn(t.shape, generator=g) * 0.05
        elif t.dim() == 1:  # BatchNorm / LayerNorm scale
            v = 1 + torch.randn(t.shape, generator=g) * 0.1
        else:
            fan_in = t[0].numel() if key != 'cls_token' else 2500
            v = torch.randn(t.shape, generator=g) / fan_in ** 0.5
        out[key] = v.to(t.dtype)
    return out


def golden_input(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=_generator(f'input{height}x{width}'))
