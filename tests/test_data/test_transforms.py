"""The training transforms on the installed Pillow: timm's RandAugment posterize at full
magnitude (0 bits kept) must give the black image older Pillow gave, not raise."""
import numpy as np
import pytest
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


def smooth_jpeg(path, width, height):
    rng = np.random.default_rng(1)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), np.uint8))
    coarse.resize((width, height), Image.BICUBIC).save(path, quality=95)
    return path


def deit_transform():
    aug = OmegaConf.structured(AugConfig(auto_augment=None, hflip=0.0, color_jitter=0.0))
    return build_transform(aug, OmegaConf.structured(DataConfig(input_size=64)),
                           is_training=True)


def test_the_crop_draws_what_timms_draws_and_decodes_jpegs_at_a_reduced_scale(tmp_path):
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    from conformer.data.images import read_image, read_planned
    from conformer.data.transforms import DraftResizedCrop
    path = smooth_jpeg(tmp_path / 'big.jpg', 1000, 800)
    ours = deit_transform().transforms[0]
    assert isinstance(ours, DraftResizedCrop)
    timm_crop = RandomResizedCropAndInterpolation(64, interpolation='bicubic')
    decoded = read_image(path, 3)
    reduced = 0
    for seed in range(20):
        random.seed(seed)
        expected = np.asarray(timm_crop(decoded), np.float32)
        after_timm = random.random()
        random.seed(seed)
        planned = read_planned(path, 3, ours.plan)  # crop drawn before decoding
        reduced += planned.size != (1000, 800)
        got = np.asarray(ours(planned), np.float32)
        assert random.random() == after_timm  # the same draws, in the same order
        assert got.shape == expected.shape == (64, 64, 3)
        assert np.abs(got - expected).mean() < 2.0, seed  # the same crop of the same image
    assert reduced >= 10  # most crops of a 1000x800 image to 64 px decode at 1/2 or less


def test_a_jpeg_that_fails_to_decode_is_still_named_with_the_planned_crop(tmp_path, caplog):
    import logging

    from conformer.data import ImageFolder, SeededTransform
    (tmp_path / 'c').mkdir()
    good = smooth_jpeg(tmp_path / 'c' / 'good.jpg', 200, 160)
    cut = smooth_jpeg(tmp_path / 'c' / 'cut.jpg', 200, 160)
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) * 6 // 10])  # the header reads
    transform = deit_transform()
    train = SeededTransform(ImageFolder(str(tmp_path)), transform)
    with caplog.at_level(logging.WARNING):
        img, _ = train.__getitems__([(0, 7)])[0]  # cut.jpg sorts first
    assert tuple(img.shape) == (3, 64, 64) and 'cut.jpg' in caplog.text and good.exists()
    again, _ = train.__getitems__([(0, 7)])[0]
    assert np.array_equal(img.numpy(), again.numpy())  # seeded: the same view every time
    evaluation = SeededTransform(ImageFolder(str(tmp_path), exact_count=True), transform)
    with pytest.raises(ValueError, match='cut.jpg.*a stand-in would change the score'):
        evaluation.__getitems__([(0, 7)])


def test_the_fused_tensor_step_gives_totensor_and_normalize_values():
    from torchvision import transforms as T

    from conformer.data.transforms import ToNormalizedTensor
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8))
    expected = T.Normalize(mean, std)(T.ToTensor()(img))
    got = ToNormalizedTensor(mean, std)(img)
    assert got.shape == (3, 5, 7) and got.dtype == expected.dtype
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=2e-6)
    assert any(isinstance(step, ToNormalizedTensor) for step in deit_transform().transforms)
    gray = Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7))
    np.testing.assert_allclose(ToNormalizedTensor((0.5,), (0.25,))(gray).numpy(),
                               T.Normalize((0.5,), (0.25,))(T.ToTensor()(gray)).numpy(),
                               atol=2e-6)
    # the small-image path (centre crop, nothing random) of a grey 28 px image, as torchvision's
    small = OmegaConf.structured(DataConfig(input_size=28, mean=[0.286], std=[0.353]))
    pad = OmegaConf.structured(AugConfig(train_crop='pad', pad=0, hflip=0.0))
    digit = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8))
    for is_training in (True, False):
        got = build_transform(pad, small, is_training)(digit)
        np.testing.assert_allclose(got.numpy(), T.Normalize((0.286,), (0.353,))(
            T.ToTensor()(digit)).numpy(), rtol=0, atol=2e-6)
