"""Dataset construction from the `data` config group."""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST
from .folder import ImageFolder
from .shards import ShardDataset


class ClassSubset(Dataset):
    """Keeps the listed classes (relabelled 0..k-1 in the given order) and, optionally, the
    first `per_class` images of each in a seeded shuffle: few-label transfer experiments.

    Args:
        dataset: a dataset with integer `targets` (and optionally `classes` names).
        classes: the class indices to keep, in their new label order.
        per_class: images kept per class; None keeps all.
        seed: seed of the shuffle `per_class` takes from.

    Raises:
        ValueError: a class is out of range or has fewer than `per_class` images.
    """

    def __init__(self, dataset: Dataset, classes: Sequence[int], per_class: Optional[int] = None,
                 seed: int = 0):
        targets = torch.as_tensor(dataset.targets)
        num_classes = int(targets.max()) + 1
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f'data.classes {bad} out of range: the dataset has classes '
                             f'0..{num_classes - 1}')
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
        keep: List[int] = []
        for c in classes:
            members = order[targets[order] == c]
            if per_class is not None:
                if len(members) < per_class:
                    raise ValueError(f'class {c} has {len(members)} images, fewer than '
                                     f'data.samples_per_class={per_class}')
                members = members[:per_class]
            keep += members.tolist()
        self.dataset, self.indices = dataset, sorted(keep)
        relabel = {c: i for i, c in enumerate(classes)}
        self.targets = [relabel[int(targets[i])] for i in self.indices]
        names = getattr(dataset, 'classes', None)
        self.classes = [names[c] for c in classes] if names else [str(c) for c in classes]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        img, _ = self.dataset[self.indices[index]]
        return img, self.targets[index]


class Unlabelled(Dataset):
    """`dataset` without its labels: target -1 and no classes (self-supervised pretraining)."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.classes = dataset, []
        self.targets = torch.full((len(dataset),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index][0], -1


def build_datasets(data) -> Tuple[Dataset, Optional[Dataset], List[str]]:
    """(train, eval, class names) for `data.name` in {'fashion_mnist', 'imagefolder', 'shards'}.

    With data.labelled=false the training set has no labels (targets -1, no classes): an image
    folder is then listed at any depth, without class folders. The evaluation set keeps its
    labels, and is None for an unlabelled folder without an evaluation split.

    Args:
        data: the `data` config group (`DataConfig`): name, root, splits, in_chans, class
            subset and download settings.

    Raises:
        ValueError: the config names no usable dataset, or the splits' classes differ.
    """
    if data.name == 'fashion_mnist':
        if data.in_chans != 1:
            raise ValueError('Fashion-MNIST is grayscale: set data.in_chans=1')
        train = FashionMNIST(data.root, 'train', download=data.download)
        evaluation = FashionMNIST(data.root, 'test', download=data.download)
    elif data.name in ('imagefolder', 'shards'):
        if not data.root:
            layout = (f'{data.train_split}/ and {data.eval_split}/ class folders'
                      if data.name == 'imagefolder' else 'tar shards and their _info.json')
            raise ValueError(f'data.root is not set: point it at a folder with {layout}')
        root = Path(data.root).expanduser()
        if data.name == 'shards':
            train = ShardDataset(root, data.train_split, data.in_chans, data.strict,
                                 workers=data.index_workers)
            evaluation = ShardDataset(root, data.eval_split, data.in_chans, data.strict,
                                      exact_count=True, workers=data.index_workers)
        elif not data.labelled:
            folder = root / data.train_split
            train = ImageFolder(folder if folder.is_dir() else root, data.in_chans, data.strict,
                                labelled=False, workers=data.index_workers)
            folder = root / data.eval_split
            evaluation = (ImageFolder(folder, data.in_chans, data.strict, exact_count=True,
                                      workers=data.index_workers) if folder.is_dir() else None)
            return train, evaluation, []
        else:
            train = ImageFolder(root / data.train_split, data.in_chans, data.strict,
                                workers=data.index_workers)
            evaluation = ImageFolder(root / data.eval_split, data.in_chans, data.strict,
                                     exact_count=True, workers=data.index_workers)
        if train.classes != evaluation.classes:
            missing = sorted(set(train.classes) ^ set(evaluation.classes))
            raise ValueError(f'the {data.train_split} and {data.eval_split} splits under {root} '
                             f'have different classes (differing: {missing[:10]})')
    else:
        raise ValueError(f"data.name must be 'fashion_mnist', 'imagefolder' or 'shards', got "
                         f"{data.name!r}")
    if not data.labelled:
        return Unlabelled(train), evaluation, []
    classes = list(train.classes)
    if data.classes is not None:
        train = ClassSubset(train, list(data.classes), data.samples_per_class, data.subset_seed)
        evaluation = ClassSubset(evaluation, list(data.classes))
        classes = train.classes
    elif data.samples_per_class is not None:
        train = ClassSubset(train, range(len(classes)), data.samples_per_class, data.subset_seed)
    return train, evaluation, classes
