"""Process groups under torchrun or SLURM's srun (DDP/FSDP2: NCCL on GPU, gloo on CPU), and
the collectives the engine uses.

Launched plainly, a run is one process. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) every process joins one group; those variables
are read in one place, `conformer.runtime.launch_env`, which the data index shares. They are
checked before any work (`check_launch`): a bad one is named, and a rank waiting for the others
says so and gives up after a timeout.

NCCL groups take CUDA tensors only, so every collective here moves its tensor to
`collective_device()` and back.
"""
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from conformer.runtime import Launch, LaunchError, env_int, launch_env

_DEFAULT_PORT = 29500
_store: Optional[dist.Store] = None  # the rendezvous, kept for init_process_group


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as `scontrol show hostnames` lists it:
    'gpu[003-005,009],cpu1' -> 'gpu003'."""
    prefix, ranges = re.match(r'([^,\[]*)(?:\[([^\]]*)\])?', nodelist.strip()).groups()
    return prefix + re.split('[-,]', ranges)[0] if ranges else prefix


# seconds a rank waits for the others to join the rendezvous (CONFORMER_RENDEZVOUS_TIMEOUT)
RENDEZVOUS_TIMEOUT = 600.


def rendezvous_timeout() -> float:
    """How long a rank waits for the others, from CONFORMER_RENDEZVOUS_TIMEOUT (seconds)."""
    value = os.environ.get('CONFORMER_RENDEZVOUS_TIMEOUT')
    if value is None:
        return RENDEZVOUS_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.
    if not seconds > 0:
        raise LaunchError(f'CONFORMER_RENDEZVOUS_TIMEOUT={value!r} must be a number of '
                          f'seconds > 0')
    return seconds


def check_launch() -> Launch:
    """Read and check the launcher's variables before any work (see `launch_env`)."""
    launch = launch_env()
    if launch.world_size > 1:
        master_address()
        rendezvous_timeout()
    return launch


def master_address() -> Tuple[str, str]:
    """Where rank 0 serves the rendezvous: MASTER_ADDR and MASTER_PORT when set; else under
    srun the first host of the job's nodes and a port derived from the job id (so jobs sharing
    a node do not collide); else this host."""
    env = os.environ
    if 'WORLD_SIZE' not in env and 'SLURM_PROCID' in env:
        nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') \
            or env.get('SLURM_NODELIST') or '127.0.0.1'
        default = first_host(nodes), str(20000 + env_int('SLURM_JOB_ID', 0) % 20000)
    else:
        default = '127.0.0.1', str(_DEFAULT_PORT)
    port = env.get('MASTER_PORT') or default[1]
    if 'MASTER_PORT' in env and not (port.isdigit() and 0 < int(port) < 2 ** 16):
        raise LaunchError(f'MASTER_PORT={port!r} is not a TCP port (1-65535)')
    return env.get('MASTER_ADDR') or default[0], port


def launched_rank() -> int:
    """This process's rank in the launch (0 when launched plainly)."""
    return launch_env().rank


def _launcher_variables() -> str:
    names = ('WORLD_SIZE', 'RANK') if 'WORLD_SIZE' in os.environ else ('SLURM_NTASKS',
                                                                        'SLURM_PROCID')
    return ' '.join(f'{name}={os.environ.get(name)}' for name in names)


def rendezvous_store(launch: Launch) -> dist.Store:
    """The key-value store every rank of the launch reaches (MASTER_ADDR:MASTER_PORT, or
    torchrun's agent store), created once and reused by `init_distributed`. While it waits
    for the other ranks it says so on stderr, and it gives up after `rendezvous_timeout()`.

    Raises:
        LaunchError: not every rank joined in time.
    """
    global _store
    if _store is None:
        os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = master_address()  # for env://
        where = f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}'
        timeout = rendezvous_timeout()
        print(f'rank {launch.rank} of {launch.world_size} ({_launcher_variables()}): waiting up '
              f'to {timeout:.0f} s for the other ranks to join at {where}', file=sys.stderr,
              flush=True)
        try:
            _store, _, _ = next(dist.rendezvous('env://', rank=launch.rank,
                                                world_size=launch.world_size,
                                                timeout=timedelta(seconds=timeout)))
        except (RuntimeError, dist.DistError) as e:  # DistStoreError: a timeout
            raise LaunchError(
                f'rank {launch.rank} of {launch.world_size}: the other ranks did not join at '
                f'{where} within {timeout:.0f} s ({_launcher_variables()}; '
                f'{str(e).splitlines()[0] if str(e) else type(e).__name__}). Start all '
                f'{launch.world_size} processes (srun, or torchrun --nproc-per-node), or unset '
                f'the launcher variables to run one; CONFORMER_RENDEZVOUS_TIMEOUT=<seconds> '
                f'waits longer') from None
    return _store


def launch_time() -> float:
    """The run's start time, the same on every rank: rank 0's clock, shared through the
    rendezvous store, so that ranks starting in different seconds name one run folder. A
    restarted torchrun attempt keeps the first attempt's time (and so its folder)."""
    launch = launch_env()
    if launch.world_size == 1:
        return time.time()
    store, key = rendezvous_store(launch), 'conformer/launch_time'
    if launch.rank == 0:
        store.compare_set(key, '', repr(time.time()))  # set only if no attempt has set it yet
    return float(store.get(key))


def pick_device(preference: str, local_rank: int = 0, key: str = 'trainer.device') -> torch.device:
    """The device a process runs on.

    Args:
        preference: 'auto' (CUDA when visible), 'cpu' or 'cuda'.
        local_rank: this process's GPU index on its node.
        key: the config key that set it, for messages.

    Raises:
        ValueError: 'cuda' without a visible GPU.
    """
    if preference == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'{key}=cuda but no CUDA GPU is visible; use {key}=cpu')
    if preference == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda', local_rank)


def init_distributed(device_preference: str, key: str = 'trainer.device') -> DistEnv:
    """Join the launch's process group (NCCL for GPUs, gloo for CPUs); one process needs none.

    Args:
        device_preference: 'auto', 'cpu' or 'cuda'.
        key: the config key that set it, for messages.
    """
    launch = launch_env()
    device = pick_device(device_preference, launch.local_rank, key)
    if launch.world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                store=rendezvous_store(launch), rank=launch.rank,
                                world_size=launch.world_size,
                                device_id=device if device.type == 'cuda' else None)
    return DistEnv(launch.rank, launch.world_size, launch.local_rank, device)


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device whose tensors the process group takes: the CPU when it has a CPU backend
    (gloo), else this process's GPU (an NCCL group takes CUDA tensors only)."""
    backends = str(dist.get_backend_config())  # e.g. 'cpu:gloo,cuda:gloo' or 'cuda:nccl'
    if any(entry.split(':')[0].strip() == 'cpu' for entry in backends.split(',')):
        return torch.device('cpu')
    return torch.device('cuda', torch.cuda.current_device())


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, returned on its own device (identity without a process group).

    Args:
        values: this rank's tensor.
    """
    if not _group_active():
        return values
    reduced = values.to(collective_device())
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def barrier() -> None:
    """Wait for every rank; a one-element all-reduce on the group's device, which every
    backend takes (a plain `dist.barrier()` sends a CPU tensor to a CUDA-only group)."""
    if _group_active():
        all_sum(torch.zeros(1))


@torch.no_grad()
def distribute_bn(*models: Optional[nn.Module]) -> None:
    """Average BatchNorm running statistics over ranks, in one all-reduce.

    Under DDP or FSDP each rank updates its own running mean and variance from its own images
    (and an EMA copy follows its own rank's); averaging them before evaluation and before a
    checkpoint is written gives every rank, and the saved weights, one set. As timm's
    `distribute_bn(reduce=True)`. A no-op without a process group.

    Args:
        models: the modules to average; None entries (e.g. no EMA) are skipped.
    """
    if not _group_active() or dist.get_world_size() == 1:
        return
    stats = [buf for model in models if model is not None for name, buf in model.named_buffers()
             if name.rsplit('.', 1)[-1] in ('running_mean', 'running_var')]
    if not stats:
        return
    flat = torch.cat([buf.reshape(-1).double() for buf in stats])
    flat = all_sum(flat) / dist.get_world_size()
    for buf, mean in zip(stats, flat.split([buf.numel() for buf in stats])):
        buf.copy_(mean.view_as(buf))


def shutdown() -> None:
    global _store
    if _group_active():
        dist.destroy_process_group()
    _store = None
