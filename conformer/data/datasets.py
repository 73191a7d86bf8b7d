"""Dataset construction from the `data` config group."""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST
from .folder import ImageFolder


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


def build_datasets(data) -> Tuple[Dataset, Dataset, List[str]]:
    """(train, eval, class names) for `data.name` in {'fashion_mnist', 'imagefolder'}.

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
    elif data.name == 'imagefolder':
        if not data.root:
            raise ValueError('data.root is not set: point it at a folder with '
                             f'{data.train_split}/ and {data.eval_split}/ class folders')
        root = Path(data.root).expanduser()
        train = ImageFolder(root / data.train_split, data.in_chans, data.strict)
        evaluation = ImageFolder(root / data.eval_split, data.in_chans, data.strict,
                                 exact_count=True)
        if train.classes != evaluation.classes:
            missing = sorted(set(train.classes) ^ set(evaluation.classes))
            raise ValueError(f'{data.train_split}/ and {data.eval_split}/ under {root} have '
                             f'different class folders (differing: {missing[:10]})')
    else:
        raise ValueError(f"data.name must be 'fashion_mnist' or 'imagefolder', got {data.name!r}")
    classes = list(train.classes)
    if data.classes is not None:
        train = ClassSubset(train, list(data.classes), data.samples_per_class, data.subset_seed)
        evaluation = ClassSubset(evaluation, list(data.classes))
        classes = train.classes
    elif data.samples_per_class is not None:
        train = ClassSubset(train, range(len(classes)), data.samples_per_class, data.subset_seed)
    return train, evaluation, classes
