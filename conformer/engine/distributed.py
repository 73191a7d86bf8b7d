"""Process-group setup for torchrun (DDP: NCCL on GPU, gloo on CPU) and small collectives.

Launched plainly, a run is one process; under torchrun the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) selects DDP. Nothing else in the engine reads those variables.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu')
    if preference == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda', local_rank)


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when launched plainly)."""
    return int(os.environ.get('RANK', 0))


def init_distributed(device_preference: str) -> DistEnv:
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = launched_rank(), int(os.environ.get('LOCAL_RANK', 0))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    return DistEnv(rank, world_size, local_rank, device)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
