"""Process-wide CPU settings and hardware facts shared by the trainer, deploy and benchmark."""
import ctypes
import sys

import torch

__all__ = ['keep_freed_memory', 'native_bf16']

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc keep freed tensor buffers for reuse instead of unmapping them.

    By default large buffers are mmapped and unmapped, and the heap's top is trimmed, so each
    CPU forward or training step faults its activations' pages back in: about 4,600 faults
    and 18 ms of kernel time per quickstart step, more for larger models and batches. Other
    C libraries and systems (musl, macOS, Windows) are left alone.
    """
    if not sys.platform.startswith('linux'):
        return  # ctypes.CDLL(None) is not even allowed on Windows
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a C library without mallopt
        return
    mallopt(M_MMAP_MAX, 0)  # every size from the heap, which is kept
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value its int argument takes


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions in hardware.

    CPUs without AVX-512 or AVX-NE-CONVERT (AMD before Zen 4, Intel client chips before Arrow
    Lake) have no oneDNN bf16 path: PyTorch emulates bf16 there, several times slower than
    fp32 (7x per quickstart step on a Zen 3), so bf16 autocast slows work down.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return (device.type == 'cpu' and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())
