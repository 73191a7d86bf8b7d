"""Tiny ImageFolder trees that the training tests make: one noisy colour per class."""
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, classes=3, per_class=12, size=16) -> Path:
    """Each class is a noisy image of its own colour: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (('train', per_class), ('val', per_class // 2)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3))
                base[..., c % 3] = 200
                noise = rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
                    folder / f'{i}.png')
    return root
