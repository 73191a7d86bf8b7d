"""ImageFolder for any user dataset: `root/<class name>/<image>`, one folder per class, or with
labelled=False every image under `root` at any depth (self-supervised pretraining, label -1).

The listing comes from an index (`index.py`): made once, with every header opened in parallel
worker processes, then loaded by every later run and rank in well under a second.

Unlike torchvision's, it names the problem when the tree is wrong, reads every image as
`images.read_image` does (EXIF orientation, every mode to the model's channels), and deals with
unreadable files by name instead of killing a run hours in:

* Listing opens each file's header, so files that are not images PIL can read (damaged, empty,
  another format, a decompression bomb) are skipped with a warning naming them (strict=False)
  or refused (strict=True), and the dataset's length counts readable images only. A class
  folder without one readable image is an error naming the folder.
* A file whose header reads but whose pixels do not decode (cut short after the header) is found
  only when it is loaded: strict=True refuses it; in training (exact_count=False) another image
  of the same class stands in, with a warning; in evaluation (exact_count=True) it is an error
  naming the file, since a stand-in would change the score.
"""
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, READ_ERRORS, read_planned, to_mode
from .index import Listing, list_tree, load_or_build, tree_change

__all__ = ['ImageFolder', 'IndexedImages', 'to_mode']

_logger = logging.getLogger(__name__)
_NAMED_IN_WARNING = 10  # unreadable files named in the listing's warning; the rest are counted


class IndexedImages(Dataset):
    """Images listed by an index, yielding (PIL image, target); target -1 when unlabelled.

    Subclasses say where the bytes of entry i are (`source`) and how errors name it (`where`).
    Provides `classes`, `targets` (a tensor) and the unreadable-file policy.
    """

    listing: Listing

    def __init__(self, listing: Listing, in_chans: int, strict: bool, exact_count: bool,
                 name: str):
        if in_chans not in (1, 3):
            raise ValueError(f'images are read with 1 or 3 channels, got in_chans={in_chans}')
        self.listing, self.in_chans = listing, in_chans
        self.strict, self.exact_count = strict, exact_count
        self.classes: List[str] = list(listing.classes)
        self.targets = torch.from_numpy(listing.labels.astype(np.int64))
        self._by_label: Optional[Tuple[np.ndarray, np.ndarray]] = None  # see _members
        if listing.unreadable:
            if strict:
                raise ValueError(f'cannot read image {listing.unreadable[0]} (set '
                                 f'data.strict=false to skip unreadable files)')
            more = len(listing.unreadable) - _NAMED_IN_WARNING
            _logger.warning('skipping %d unreadable images under %s: %s%s',
                            len(listing.unreadable), name,
                            '; '.join(listing.unreadable[:_NAMED_IN_WARNING]),
                            f'; and {more} more' if more > 0 else '')

    def __len__(self) -> int:
        return len(self.listing)

    def source(self, index: int) -> Union[str, BinaryIO]:
        """A path or file object holding image `index`'s encoded bytes."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """How messages name image `index` (its file)."""
        raise NotImplementedError

    def load(self, index: int, plan: Optional[Callable[[Image.Image], None]] = None
             ) -> Image.Image:
        """Read image `index` with `in_chans` channels, without the unreadable-file fallback.

        Args:
            index: position in the listing.
            plan: sees a JPEG before it decodes (`images.read_planned`).
        """
        return read_planned(self.source(index), self.in_chans, plan)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        return self.get(index)

    def get(self, index: int, plan: Optional[Callable[[Image.Image], None]] = None
            ) -> Tuple[Image.Image, int]:
        """`dataset[index]`, with `plan` (a crop's) seeing the image before it decodes; a
        stand-in for an image that fails to decode is read without it."""
        label = int(self.listing.labels[index])
        try:
            return self.load(index, plan), label
        except READ_ERRORS as e:
            if self.strict or self.exact_count:
                why = ('set data.strict=false to skip unreadable files' if self.strict else
                       'evaluation counts every listed image, and a stand-in would change the '
                       'score: repair or remove the file')
                raise ValueError(f'cannot read image {self.where(index)}: {e} ({why})') from e
            _logger.warning('unreadable image %s (%s): another image of its class stands in',
                            self.where(index), e)
        members = self._members(label)
        position = int(np.searchsorted(members, index))
        for offset in range(1, len(members)):
            stand_in = int(members[(position + offset) % len(members)])
            try:
                return self.load(stand_in), label
            except READ_ERRORS:
                continue
        raise ValueError(f'{self.group(label)} holds no readable image (every file fails '
                           f'to decode, e.g. {self.where(index)}); replace or remove those files')

    def _members(self, label: int) -> np.ndarray:
        """The entries with `label`, in order: stand-in candidates (sorted on first need,
        which keeps loading an index of a million entries free of the sort)."""
        if self._by_label is None:
            labels = self.listing.labels
            bounds = np.zeros(len(self.classes) + 2, np.int64)
            np.cumsum(np.bincount(labels + 1, minlength=len(self.classes) + 1), out=bounds[1:])
            self._by_label = np.argsort(labels, kind='stable'), bounds
        order, bounds = self._by_label
        return order[bounds[label + 1]:bounds[label + 2]]

    def group(self, label: int) -> str:
        """How messages name the images of `label` (-1: all of them)."""
        return f'class {self.classes[label]}' if label >= 0 else 'the dataset'


class ImageFolder(IndexedImages):
    """Images under `root/<class>/` (classes sorted by name), or every image under `root`
    (labelled=False), yielding (PIL image, class index or -1).

    Args:
        root: the folder holding one sub-folder of images per class (or any images, unlabelled).
        in_chans: the model's input channels, 3 ('RGB') or 1 ('L').
        strict: refuse the first unreadable file instead of skipping it.
        exact_count: every listed image must load (evaluation); without it an image that
            fails to decode is replaced by another of its class (training).
        labelled: classes from the sub-folders; False lists images at any depth with label -1.
        workers: processes that open the headers when the index is (re)built; None: the cores
            this process may use, up to 16.
    """

    def __init__(self, root: str, in_chans: int = 3, strict: bool = False,
                 exact_count: bool = False, labelled: bool = True,
                 workers: Optional[int] = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f'image folder {self.root} does not exist; set data.root to '
                                    f'a folder holding one sub-folder of images per class')
        self.root = self.root.resolve()
        listing = load_or_build(
            self.root, '' if labelled else '-unlabelled',
            'folder' if labelled else 'folder-unlabelled',
            lambda: list_tree(self.root, labelled, workers),
            lambda old: tree_change(self.root, old.stamp))
        if not len(listing) and not listing.unreadable:
            raise FileNotFoundError(f'{self.root} holds no images ({", ".join(IMAGE_SUFFIXES)})')
        if labelled:
            self._check_classes(listing)
        super().__init__(listing, in_chans, strict, exact_count, str(self.root))

    def _check_classes(self, listing: Listing) -> None:
        counts = np.bincount(listing.labels, minlength=len(listing.classes))
        for name, count in zip(listing.classes, counts.tolist()):
            if count:
                continue
            folder = self.root / name
            bad = [u for u in listing.unreadable if u.startswith(f'{folder}/')]
            if bad:
                raise ValueError(f'class folder {folder} holds no readable image (all '
                                 f'{len(bad)} files fail to open, e.g. {bad[0]}); replace '
                                 f'them or remove the folder')
            raise FileNotFoundError(f'class folder {folder} holds no images '
                                    f'({", ".join(IMAGE_SUFFIXES)}); add images or remove the '
                                    f'folder')

    @property
    def samples(self) -> List[Tuple[str, int]]:
        """(path, label) of every image, as torchvision's ImageFolder has them."""
        return [(str(self.root / n), int(t))
                for n, t in zip(self.listing.names(), self.listing.labels)]

    def source(self, index: int) -> str:
        return f'{self.root}{os.sep}{self.listing.name(index)}'

    where = source

    def group(self, label: int) -> str:
        return f'class folder {self.root / self.classes[label]}' if label >= 0 else str(self.root)
