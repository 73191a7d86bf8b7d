"""Read an image file the way PIL users expect, the same in training, evaluation, prediction and
visualisation.

* EXIF orientation is applied (`ImageOps.exif_transpose`): a phone photo taken upright is fed
  upright, as every viewer shows it.
* Every mode becomes the model's channels: 'RGB' for in_chans=3, 'L' for in_chans=1.
  Transparency is composited on white (transparent pixels would otherwise turn black).
* High bit depths are scaled into 0..255 by a fixed rule, not by each image's own range (that
  would change an image's brightness with its content): 16-bit integer modes (``I;16*``) and
  32-bit integer 'I' (the mode 16-bit PNG and TIFF files open in) are read as 0..65535, divided
  by 257; float 'F' is read as 0..1, times 255. Values outside the range are clipped.
"""
import io
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ['IMAGE_SUFFIXES', 'READ_ERRORS', 'check_image_header', 'read_image', 'to_mode']
_ORIENTATION = 0x0112  # the EXIF tag

# file name endings read as images (compared in lower case)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.ppm', '.pgm', '.bmp', '.tif', '.tiff', '.webp',
                  '.gif')
# what PIL raises for a damaged, unsupported or oversized (decompression bomb) file
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
               Image.DecompressionBombError)

_CHANNEL_MODES = {1: 'L', 3: 'RGB'}
_SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def read_image(path: Union[str, Path, BinaryIO], in_chans: int) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied) and in the model's mode.

    Args:
        path: an image file in any format PIL reads (or a binary file object holding one).
        in_chans: the model's input channels, 3 ('RGB') or 1 ('L').

    Raises one of `READ_ERRORS` for a file that is not a readable image.
    """
    return read_planned(path, in_chans)


def read_planned(path: Union[str, Path, BinaryIO], in_chans: int,
                 plan: Optional[Callable[[Image.Image], None]] = None) -> Image.Image:
    """`read_image`, letting `plan` see a JPEG before it is decoded (to set a draft scale)
    when the JPEG needs no orientation or mode change; the result is decoded either way, so
    a damaged file fails in this call, where the dataset names it.

    Args:
        path: an image file in any format PIL reads (or a binary file object holding one).
        in_chans: the model's input channels, 3 ('RGB') or 1 ('L').
        plan: called with the undecoded image (see transforms.DraftResizedCrop.plan).
    """
    if plan is not None and not hasattr(path, 'read'):
        with open(path, 'rb') as f:  # one read; the image decodes from memory
            path = io.BytesIO(f.read())
    with Image.open(path) as img:
        if plan is not None and img.format == 'JPEG' and \
                img.mode == _CHANNEL_MODES.get(in_chans) and \
                img.getexif().get(_ORIENTATION, 1) == 1:
            plan(img)
            img.load()
            return img
        img.load()
        return to_mode(ImageOps.exif_transpose(img), in_chans)


def check_image_header(path: Union[str, Path]) -> None:
    """Raise one of `READ_ERRORS` unless `path` starts like an image PIL can read and is not a
    decompression bomb: a cheap check (the header only) for listing a dataset.

    Args:
        path: the image file.
    """
    with Image.open(path):
        pass


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to 'RGB' or 'L', as the module docstring says.

    Args:
        img: a loaded image of any mode.
        in_chans: 3 for 'RGB', 1 for 'L'.
    """
    if in_chans not in _CHANNEL_MODES:
        raise ValueError(f'images are read with 1 or 3 channels, got in_chans={in_chans}')
    target = _CHANNEL_MODES[in_chans]
    if img.mode == target:
        return img
    if img.mode in _SIXTEEN_BIT or img.mode == 'F':
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        values = values * 255 if img.mode == 'F' else values / 257
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(target)
