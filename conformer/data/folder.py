"""ImageFolder for any user dataset: `root/<class name>/<image>`, one folder per class.

Unlike torchvision's, it names the problem when the tree is wrong, converts every image
mode (grayscale, palette, RGBA, CMYK, 16-bit) to the model's channels, and skips a corrupt
or truncated file with a warning naming it, instead of killing a run hours in.
"""
import logging
import os
from pathlib import Path
from typing import List, Tuple

from PIL import Image
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp', '.gif')


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to 'RGB' (in_chans=3) or 'L' (in_chans=1)."""
    target = {1: 'L', 3: 'RGB'}[in_chans]
    if img.mode == target:
        return img
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):  # 16/32-bit grayscale: scale to 8 bits
        img = img.point(lambda v: v / 256).convert('L')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        # composite on white so transparent pixels do not turn black
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(target)


class ImageFolder(Dataset):
    """Images under `root/<class>/`, classes sorted by name, yielding (PIL image, class index).

    strict=False: a file that fails to decode is logged by name and replaced by the next
    readable sample, so a batch keeps its size; strict=True raises on the first such file.
    """

    def __init__(self, root: str, in_chans: int = 3, strict: bool = False):
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
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(str(p) for p in (self.root / name).rglob('*')
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise FileNotFoundError(
                    f'class folder {self.root / name} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
                    f'add images or remove the folder')
            self.samples += [(f, label) for f in files]
        self.targets = [label for _, label in self.samples]
        self.in_chans = in_chans
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path, _ = self.samples[index]
        with Image.open(path) as img:
            img.load()
            return to_mode(img, self.in_chans)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return self.load(i), self.targets[i]
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
                if self.strict:
                    raise RuntimeError(f'cannot read image {self.samples[i][0]}: {e} (set '
                                       f'data.strict=false to skip unreadable files)') from e
                _logger.warning('skipping unreadable image %s: %s', self.samples[i][0], e)
        raise RuntimeError(f'no readable image in {self.root}')
