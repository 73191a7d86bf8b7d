"""The training transforms on the installed Pillow: timm's RandAugment posterize at full
magnitude (0 bits kept) must give the black image older Pillow gave, not raise."""
import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from conformer.data.transforms import build_transform
from conformer.engine.config import AugConfig, DataConfig


def posterize_op(train_crop):
    aug = OmegaConf.structured(AugConfig(train_crop=train_crop,
                                         auto_augment='rand-m9-mstd0.5-inc1'))
    transform = build_transform(aug, OmegaConf.structured(DataConfig()), is_training=True)
    ops = [op for step in transform.transforms for op in getattr(step, 'ops', [])]
    op = next(op for op in ops if op.name == 'PosterizeIncreasing')
    op.prob, op.magnitude_std = 1.0, 0.0
    return op


def test_randaugment_posterize_keeps_zero_bits_black_and_others_as_pillow_does():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8))
    for train_crop in ('rrc', 'pad'):
        op = posterize_op(train_crop)
        op.magnitude = 10  # 4 - 4 = 0 bits kept: rand-m9-mstd0.5 reaches it
        assert not np.asarray(op(img)).any()
        op.magnitude = 5  # 4 - 2 = 2 bits kept
        assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 2)))
