"""Shared pytest setup.

TRITON_INTERPRET=1 must be in the environment before any ``@triton.jit`` decorator runs
(Triton picks the interpreter at decoration time), so it is set here, before test modules
import ``conformer``. With it, the Triton kernels run on CPU tensors and are tested without a GPU.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

# weight files shared by the weights, convert and download tests (imported after the line above)
from weight_files import layouts, quickstart, reference  # noqa: E402, F401
