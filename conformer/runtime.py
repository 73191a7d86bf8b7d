"""Process-wide CPU settings, hardware facts and the launcher's place for this process, shared
by the data pipeline, the trainer, deploy and benchmark."""
import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ['BF16_INSTRUCTIONS', 'Launch', 'LaunchError', 'available_cores', 'cpu_description',
           'cpu_flags', 'env_int', 'keep_freed_memory', 'launch_env', 'native_bf16']

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, cgroups' cpusets) where
    the OS has one, else every core."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Have glibc keep freed tensor buffers for reuse instead of unmapping them.

    By default large buffers are mmapped and unmapped, and the heap's top is trimmed, so each
    CPU forward or training step faults its activations' pages back in, in kernel time that
    grows with the model and the batch. Other C libraries and systems (musl, macOS, Windows)
    are left alone.
    """
    if not sys.platform.startswith('linux'):
        return  # ctypes.CDLL(None) is not even allowed on Windows
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a C library without mallopt
        return
    mallopt(M_MMAP_MAX, 0)  # every size from the heap, which is kept
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value its int argument takes


# the x86 flags of a bf16 dot product or conversion in hardware
BF16_INSTRUCTIONS = frozenset({'avx512_bf16', 'amx_bf16', 'avx_ne_convert'})


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions in hardware.

    On x86 that takes a bf16 instruction: AVX512_BF16 (AMD Zen 4, Intel Cooper Lake and
    Sapphire Rapids on), AMX-BF16 or AVX-NE-CONVERT. oneDNN also accepts bf16 on AVX-512 CPUs
    without them (Intel Skylake-SP to Ice Lake) and on AVX2-only ones, but emulates it there,
    several times slower than fp32, so bf16 autocast would slow work down.

    Args:
        device: a torch.device or its name; devices other than CPU and CUDA count as without.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if not (device.type == 'cpu' and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = cpu_flags()
    return flags is None or bool(flags & BF16_INSTRUCTIONS)


def _cpuinfo() -> Optional[dict]:
    """The first processor's entries in /proc/cpuinfo, or None where there is none."""
    try:
        with open('/proc/cpuinfo') as f:
            lines = f.read().split('\n\n')[0].splitlines()
    except OSError:
        return None
    return {k.strip(): v.strip() for k, v in (line.split(':', 1) for line in lines if ':' in line)}


def cpu_flags() -> Optional[frozenset]:
    """The x86 CPU's instruction-set flags, or None where they are unknown (not Linux, not x86:
    there oneDNN's own check stands)."""
    info = _cpuinfo()
    if info is None or 'flags' not in info:
        return None
    return frozenset(info['flags'].split())


def cpu_description() -> str:
    """The CPU's model name, family/model numbers and its matmul instruction sets, from
    /proc/cpuinfo (``platform.processor()`` where that is missing). Cloud CPUs often report only
    "AMD EPYC"; the family tells the generations apart (25: Zen 3/4, 26: Zen 5), and with it
    the fp32 peak, which doubles from Zen 4's double-pumped AVX-512 to Zen 5's."""
    info = _cpuinfo()
    if info is None:
        return platform.processor() or platform.machine()
    flags = set(info.get('flags', '').split())
    isa = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {' '.join(isa) or 'no AVX2'})")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the launch: its rank, the number of processes, and its
    rank on this node (which GPU it drives)."""
    rank: int
    world_size: int
    local_rank: int


class LaunchError(ValueError):
    """The launcher's variables (torchrun's or srun's) describe no process this can be."""


def env_int(name: str, default: Optional[int] = None, low: int = 0) -> int:
    """The integer an environment variable holds, >= `low`; a bad one is named."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise LaunchError(f'{name}={value!r} is not an integer >= {low}: the launcher (torchrun '
                          f'or srun) sets it; unset it, or launch through the launcher')
    return number


def launch_env() -> Launch:
    """This process's place in the launch: torchrun's variables first (also when torchrun runs
    under srun), then srun's, else a single process.

    Raises:
        LaunchError: a variable that is not a number, or a rank outside the world size; the
            message names the variable.
    """
    env = os.environ
    if 'WORLD_SIZE' in env:
        names = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')
    elif 'SLURM_PROCID' in env and 'SLURM_NTASKS' in env:
        names = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')
    else:
        return Launch(0, 1, 0)
    rank, world_size = env_int(names[0], 0), env_int(names[1], low=1)
    local_rank = env_int(names[2], 0)
    if rank >= world_size:
        raise LaunchError(
            f'{names[0]}={rank} with {names[1]}={world_size}: a rank must be below the number '
            f'of processes; these variables come from another launch (an inherited '
            f'environment?): unset them to run one process, or start every rank through the '
            f'launcher')
    return Launch(rank, world_size, local_rank)
