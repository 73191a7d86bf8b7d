"""ImageFolder for any user dataset: `root/<class name>/<image>`, one folder per class.

Unlike torchvision's, it names the problem when the tree is wrong, reads every image as
`images.read_image` does (EXIF orientation, every mode to the model's channels), and deals with
unreadable files by name instead of killing a run hours in:

* Listing the dataset opens each file's header, so files that are not images PIL can read
  (damaged, empty, another format, a decompression bomb) are skipped with a warning naming them
  (strict=False) or refused (strict=True), and the dataset's length counts readable images only.
  A class folder without one readable image is an error naming the folder.
* A file whose header reads but whose pixels do not decode (cut short after the header) is found
  only when it is loaded: strict=True refuses it; in training (exact_count=False) another image
  of the same class stands in, with a warning; in evaluation (exact_count=True) it is an error
  naming the file, since a stand-in would change the score.
"""
import logging
import os
from pathlib import Path
from typing import List, Tuple

from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, READ_ERRORS, check_image_header, read_image, to_mode

__all__ = ['ImageFolder', 'to_mode']

_logger = logging.getLogger(__name__)
_NAMED_IN_WARNING = 10  # unreadable files named in the listing's warning; the rest are counted


class ImageFolder(Dataset):
    """Images under `root/<class>/`, classes sorted by name, yielding (PIL image, class index).

    Args:
        root: the folder holding one sub-folder of images per class.
        in_chans: the model's input channels, 3 ('RGB') or 1 ('L').
        strict: refuse the first unreadable file instead of skipping it.
        exact_count: every listed image must load (evaluation); without it an image that
            fails to decode is replaced by another of its class (training).
    """

    def __init__(self, root: str, in_chans: int = 3, strict: bool = False,
                 exact_count: bool = False):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f'image folder {self.root} does not exist; set data.root to '
                                    f'a folder holding one sub-folder of images per class')
        if in_chans not in (1, 3):
            raise ValueError(f'ImageFolder reads 1- or 3-channel images, got in_chans={in_chans}')
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f'{self.root} has no class sub-folders; expected '
                                    f'{self.root}/<class name>/<image files>')
        self.in_chans, self.strict, self.exact_count = in_chans, strict, exact_count
        self.samples: List[Tuple[str, int]] = []
        self.class_ranges: List[range] = []  # the samples of each class, by class index
        unreadable: List[str] = []
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in (self.root / name).rglob('*')
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise FileNotFoundError(
                    f'class folder {self.root / name} holds no images '
                    f'({", ".join(IMAGE_SUFFIXES)}); add images or remove the folder')
            readable = [f for f in files if self._header_reads(f, unreadable)]
            if not readable:
                raise ValueError(f'class folder {self.root / name} holds no readable image (all '
                                 f'{len(files)} files fail to open, e.g. {files[0]}); replace '
                                 f'them or remove the folder')
            start = len(self.samples)
            self.samples += [(f, label) for f in readable]
            self.class_ranges.append(range(start, len(self.samples)))
        if unreadable:
            more = len(unreadable) - _NAMED_IN_WARNING
            _logger.warning('skipping %d unreadable images under %s: %s%s', len(unreadable),
                            self.root, '; '.join(unreadable[:_NAMED_IN_WARNING]),
                            f'; and {more} more' if more > 0 else '')
        self.targets = [label for _, label in self.samples]

    def _header_reads(self, path: str, unreadable: List[str]) -> bool:
        try:
            check_image_header(path)
            return True
        except READ_ERRORS as e:
            if self.strict:
                raise ValueError(f'cannot read image {path}: {e} (set data.strict=false to '
                                 f'skip unreadable files)') from e
            unreadable.append(f'{path} ({e})')
            return False

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """Read image `index` with `in_chans` channels, without the unreadable-file fallback.

        Args:
            index: position in `samples`.
        """
        return read_image(self.samples[index][0], self.in_chans)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        path, label = self.samples[index]
        try:
            return self.load(index), label
        except READ_ERRORS as e:
            if self.strict or self.exact_count:
                why = ('set data.strict=false to skip unreadable files' if self.strict else
                       'evaluation counts every listed image, and a stand-in would change the '
                       'score: repair or remove the file')
                raise RuntimeError(f'cannot read image {path}: {e} ({why})') from e
            _logger.warning('unreadable image %s (%s): another image of its class stands in',
                            path, e)
        members = self.class_ranges[label]
        for offset in range(1, len(members)):
            stand_in = members[(index - members.start + offset) % len(members)]
            try:
                return self.load(stand_in), label
            except READ_ERRORS:
                continue
        raise RuntimeError(f'class folder {self.root / self.classes[label]} holds no readable '
                           f'image (every file fails to decode, e.g. {path}); replace them or '
                           f'remove the folder')
