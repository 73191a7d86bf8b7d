"""Shared pytest setup.

TRITON_INTERPRET=1 must be in the environment before any ``@triton.jit`` decorator runs
(Triton picks the interpreter at decoration time), so it is set here, before test modules
import ``conformer``. With it, the Triton kernels run on CPU tensors and are tested without a GPU.
"""

import os

os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

# after the line above: helpers.weight_files imports conformer
from helpers.weight_files import CLASSES, NANO, QUICKSTART, nano, write_layouts  # noqa: E402

# weight files shared by the weights, convert, download and README tests


@pytest.fixture(scope='module')
def reference():
    """A nano Conformer with seeded random weights: what the weight files hold."""
    torch.manual_seed(0)
    return nano()


@pytest.fixture(scope='module')
def layouts(reference, tmp_path_factory):
    """Every weight-file layout users hold, of `reference`: {name: (path, expected weights)}."""
    return write_layouts(reference, tmp_path_factory.mktemp('layouts'))


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
    """A conformer-train checkpoint as `experiment=quickstart` writes it: pooled stem, grey
    28x28 inputs, 10 named classes, architecture overrides in meta['model_kwargs']."""
    torch.manual_seed(0)
    trained = nano(**QUICKSTART, in_chans=1, num_classes=10)
    meta = {'variant': NANO, 'num_classes': 10, 'in_chans': 1, 'classes': CLASSES,
            'model_kwargs': QUICKSTART, 'input_size': 28, 'mean': [0.286], 'std': [0.353],
            'interpolation': 'bilinear', 'crop_pct': 1.0}
    path = tmp_path_factory.mktemp('run') / 'best.pth'
    torch.save({'model': trained.state_dict(), 'meta': meta, 'epoch': 3}, path)
    return path, trained
