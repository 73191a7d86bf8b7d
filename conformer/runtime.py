"""Process-wide CPU settings shared by the trainer and the benchmark."""
import ctypes
import sys

__all__ = ['keep_freed_memory']

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
