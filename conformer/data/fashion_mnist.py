"""Fashion-MNIST read straight from its four IDX files (no torchvision pickles, no network).

The files come from the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/). When they are absent, torchvision's downloader fetches
the same files into the root you give.
"""
import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
           'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
MEAN, STD = (0.2860,), (0.3530,)
REFETCH = ('delete it and let the loader fetch it again (data.download=true), or if it came with '
           'the Debian package: apt-get install --reinstall dataset-fashion-mnist')
# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array shaped by its header.

    Args:
        path: the file; a ``.gz`` suffix means gzipped.

    Raises:
        ValueError: the file is truncated or not an IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip at all
        raise ValueError(f'{path} is not a complete gzip file ({e}); {REFETCH}') from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path} is not an IDX file (bad magic number {data[:4].hex()}); '
                         f'{REFETCH}')
    ndim = data[3]
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f'{path} is truncated: header says shape {shape} ({expected} bytes), '
                         f'file holds {len(body)}; {REFETCH}')
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + '.gz', stem):
        for folder in (root, root / 'FashionMNIST' / 'raw'):  # the second is torchvision's layout
            if (folder / name).is_file():
                return folder / name
    return None


def locate(root: Optional[str], download: bool) -> Path:
    """The folder holding the four IDX files: `root`, else the Debian path, else download.

    Args:
        root: a folder holding the files (also in torchvision's layout); None means the
            Debian package's folder, then ``~/.cache/conformer/fashion-mnist``.
        download: download the files with torchvision when they are not found.

    Raises:
        FileNotFoundError: the files are missing and not downloaded.
    """
    candidates = [Path(root).expanduser()] if root else [DEBIAN_DIR]
    for folder in candidates:
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    target = (Path(root).expanduser() if root
              else Path.home() / '.cache' / 'conformer' / 'fashion-mnist')
    if all(_find(target, stem) for pair in FILES.values() for stem in pair):
        return target
    fixes = (f'Install them with `apt-get install dataset-fashion-mnist` (puts them in '
             f'{DEBIAN_DIR}) or point data.root at a folder holding {FILES["train"][0]}.gz etc.')
    if not download:
        raise FileNotFoundError(f'Fashion-MNIST IDX files not found in {candidates[0]}. {fixes}, '
                                f'or set data.download=true')
    _logger.warning('Fashion-MNIST not found in %s; downloading it with torchvision into %s '
                    '(install the Debian package dataset-fashion-mnist to stay offline)',
                    candidates[0], target)
    from torchvision.datasets import FashionMNIST as _TorchvisionFashionMNIST
    try:
        _TorchvisionFashionMNIST(str(target), train=True, download=True)
        _TorchvisionFashionMNIST(str(target), train=False, download=True)
    except (RuntimeError, OSError) as e:  # torchvision's "Error downloading ..." when offline
        raise FileNotFoundError(f'Fashion-MNIST IDX files not found in {candidates[0]}, and '
                                f'downloading them into {target} failed '
                                f'({str(e).splitlines()[0]}). {fixes}.') from None
    return target


class FashionMNIST(Dataset):
    """Fashion-MNIST split ('train' 60k or 'test' 10k) yielding (PIL 'L' image, label).

    Args:
        root: the folder of the IDX files; None looks in the usual places (see `locate`).
        split: 'train' or 'test'.
        download: download the files when they are not found.
    """

    classes = CLASSES

    def __init__(self, root: Optional[str] = None, split: str = 'train', download: bool = True):
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        folder = locate(root, download)
        images_stem, labels_stem = FILES[split]
        self.images = torch.from_numpy(read_idx(_find(folder, images_stem)).copy())
        self.targets = torch.from_numpy(read_idx(_find(folder, labels_stem)).astype(np.int64))
        if self.images.ndim != 3 or len(self.images) != len(self.targets):
            raise ValueError(f'Fashion-MNIST files in {folder} disagree: images '
                             f'{tuple(self.images.shape)}, labels {tuple(self.targets.shape)}')

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[index].numpy()), int(self.targets[index])
