"""Sampling that keeps a run reproducible across resumes, worker counts and world sizes.

Every epoch has one global order (a seeded permutation). Step b consumes global batch b;
rank r takes the r-th contiguous slice of it, which its DataLoader splits into gradient
accumulation micro-batches. So 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the
same images per step, and a resume on any world size continues from the next global batch.
With repeated augmentation the copies of an image within a global batch are placed apart, so
that they land on different ranks.

Each sample travels with its own augmentation seed (from the seed, the epoch and its
position in the global order); `SeededTransform` draws the random augmentation from it.
The same image therefore gets the same augmentation whichever process loads it.
"""
import random
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .transforms import crop_planner

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant to spread nearby seeds apart


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample, distinct for nearby arguments.

    Args:
        seed: the run's seed.
        epoch: the epoch.
        position: the sample's position in the epoch's global order (-1: the order itself).
    """
    return (((seed * _MIX + epoch) * _MIX) + position) % (2 ** 63)


class GlobalBatchSampler(Sampler):
    """Yields this rank's `(index, aug_seed)` keys for global batches `start_step..` of an epoch.

    repeats > 1 is repeated augmentation (Hoffer et al.; DeiT): each image appears `repeats`
    times per epoch with different augmentations, and the epoch keeps len(dataset) samples.

    Args:
        num_samples: length of the dataset.
        global_batch: images per optimizer step over all ranks; a multiple of `world_size`.
        rank: this process's rank.
        world_size: number of ranks.
        seed: seed of the order and of the augmentation seeds.
        shuffle: shuffle each epoch (else dataset order).
        repeats: copies of each image per epoch (repeated augmentation); 1 means off.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, repeats: int = 1):
        if global_batch % world_size:
            raise ValueError(f'global batch {global_batch} is not divisible by the world size '
                             f'{world_size}; change data.batch_size')
        if num_samples < global_batch:
            raise ValueError(f'the training set has {num_samples} images, fewer than one global '
                             f'batch ({global_batch}); lower data.batch_size')
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.repeats = shuffle, repeats
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch to yield, and the global batch to start from (for a resume).

        Args:
            epoch: the epoch, which seeds its order.
            start_step: the first global batch of the epoch to yield.
        """
        self.epoch, self.start_step = epoch, start_step

    def global_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        if not self.shuffle:
            return torch.arange(self.num_samples)
        order = torch.randperm(self.num_samples, generator=g)
        if self.repeats > 1:
            order = self._spread_copies(order.repeat_interleave(self.repeats)[:self.num_samples])
        return order

    def _spread_copies(self, order: torch.Tensor) -> torch.Tensor:
        """Reorder each global batch copy by copy: first every image it holds once, then the
        second copies, then the third, in the same image order. A rank's contiguous slice then
        holds distinct images whenever the world size is at least `repeats` (the copies sit
        about global_batch / repeats apart), as in DeiT, where the copies of an image go to
        different ranks; the images of each step are the same for every world size."""
        steps, size = self.steps_per_epoch, self.global_batch
        position = torch.arange(steps * size)
        first_copy = position - position % self.repeats  # where the image's copies begin
        batch_start = position - position % size
        # which copy of its image this entry is within its own global batch
        copy = position % self.repeats - (batch_start - first_copy).clamp(min=0)
        key = (copy * size + position % size).view(steps, size)
        batches = order[:steps * size].view(steps, size)
        spread = batches.gather(1, key.argsort(dim=1)).reshape(-1)
        return torch.cat([spread, order[steps * size:]])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch // self.world_size)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self.global_order().tolist()
        share = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * share
            for position in range(first, first + share):
                yield order[position], sample_seed(self.seed, self.epoch, position)


class ShardSampler(Sampler):
    """Evaluation: rank r takes every world_size-th image, no padding, so counts stay exact.

    Args:
        num_samples: length of the dataset.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, num_samples, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededTransform(Dataset):
    """Applies `transform` to `dataset[i]`; a key `(i, seed)` seeds its randomness.

    The seed is set before the image is read: a dataset with `get(i, plan)` (the indexed
    folders and shards) lets the transform's first crop draw its parameters on the undecoded
    JPEG (`transforms.DraftResizedCrop`), with the same draws as after decoding.

    The RNG states of `random`, numpy and torch are restored afterwards, so the loading
    process's own random stream (dropout, drop path, mixup) is untouched. The DataLoader
    fetches a whole batch through `__getitems__`, which saves and restores those states once
    per batch rather than once per image (that bookkeeping cost more than a small image's
    transform).

    Args:
        dataset: yields (image, target).
        transform: applied to each image; None returns images as they are.
    """

    def __init__(self, dataset: Dataset, transform: Optional[Callable]):
        self.dataset, self.transform = dataset, transform
        # datasets that can show the crop an undecoded image (IndexedImages.get)
        self._plan = crop_planner(transform) if hasattr(dataset, 'get') else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: List) -> List[Tuple[Any, int]]:
        keys = [key if isinstance(key, tuple) else (key, None) for key in keys]
        if self.transform is None or all(seed is None for _, seed in keys):
            return [self._load(index) for index, _ in keys]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                return [self._load(index, seed) for index, seed in keys]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _load(self, index: int, seed: Optional[int] = None) -> Tuple[Any, int]:
        if self.transform is None:
            return self.dataset[index]
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            # the CPU generator only: torch.manual_seed would also queue a CUDA seeding call
            # (with a captured stack trace) per sample while CUDA is uninitialised
            torch.default_generator.manual_seed(seed)
        if self._plan is not None:  # the crop is drawn before the JPEG decodes (draft mode)
            img, target = self.dataset.get(index, self._plan)
        else:
            img, target = self.dataset[index]
        return self.transform(img), target
