"""Train and eval transforms, built on timm.data.

Two crop styles: 'rrc' (random-resized crop, the ImageNet/DeiT recipe, via
timm.data.create_transform) and 'pad' (pad-and-random-crop at the native size, the usual
choice for 28-32 px images, where a resized crop destroys most of the object).
"""
from typing import Callable, Sequence

from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T


def build_transform(aug, data, is_training: bool) -> Callable:
    """The image transform of one split, from the config: image in, normalised tensor out.

    Args:
        aug: the `aug` config group (`AugConfig`): crop style and training augmentations.
        data: the `data` config group (`DataConfig`): input size, mean, std, interpolation,
            crop_pct.
        is_training: build the augmenting training transform (else the deterministic eval one).
    """
    mean, std = tuple(data.mean), tuple(data.std)
    if aug.train_crop == 'pad':
        return _pad_crop_transform(aug, data.input_size, mean, std, is_training)
    if not is_training:
        return create_transform(data.input_size, is_training=False,
                                interpolation=data.interpolation,
                                mean=mean, std=std, crop_pct=data.crop_pct)
    return pillow_safe(create_transform(
        data.input_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
        color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
        interpolation=data.interpolation, mean=mean, std=std,
        re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count))


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep <= 0:  # every bit dropped: black, as Pillow < 13 made it
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def pillow_safe(transform: Callable) -> Callable:
    """timm's RandAugment/AugMix posterize with 0 bits kept (magnitude 10, which
    rand-m9-mstd0.5 reaches about once in 40 draws) gives a black image on Pillow < 13 and
    raises ValueError on Pillow 13, stopping a DeiT-recipe run within its first few hundred
    images. Swap in a posterize that keeps the old result. Returns `transform`, changed."""
    for step in getattr(transform, 'transforms', [transform]):
        for op in getattr(step, 'ops', []):
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _pad_crop_transform(aug, size: int, mean: Sequence[float], std: Sequence[float],
                        is_training: bool) -> Callable:
    # CenterCrop pads with zeros when the image is smaller, e.g. 28 px Fashion-MNIST -> 32
    steps = [T.CenterCrop(size)]
    if is_training:
        # steps that would do nothing are left out: on 28 px images each costs ~20 us of
        # Python per image, together ~5% of a quickstart training step
        if aug.pad:
            steps.append(T.RandomCrop(size, padding=aug.pad))
        if aug.hflip:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.auto_augment:
            fill = tuple(round(255 * m) for m in mean)
            steps.append(pillow_safe(rand_augment_transform(aug.auto_augment,
                                                            dict(img_mean=fill))))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if is_training and aug.re_prob > 0:
        steps.append(RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count,
                                   device='cpu'))
    return T.Compose(steps)
