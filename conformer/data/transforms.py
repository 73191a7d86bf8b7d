"""Train and eval transforms, built on timm.data.

Two crop styles: 'rrc' (random-resized crop, the ImageNet/DeiT recipe, via
timm.data.create_transform) and 'pad' (pad-and-random-crop at the native size, the usual
choice for 28-32 px images, where a resized crop destroys most of the object).

The random-resized crop is timm's with less work per image (`DraftResizedCrop`): it draws the
same crop from the same random stream, but when the dataset hands it an undecoded JPEG it picks
the crop before decoding, so that the JPEG decoder can scale by 1/2, 1/4 or 1/8 while the crop
still has at least the output's pixels (PIL's draft mode), and it crops and resizes in one pass.
"""
import math
import random
import warnings
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms.functional import pil_modes_mapping

_PLAN_KEY = 'conformer.crop'  # where a planned crop travels with its image (Image.info)


class DraftResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation (same parameters, same random draws), able to
    plan its crop on an undecoded image (`plan`), so the decoder does less work."""

    @classmethod
    def like(cls, crop: RandomResizedCropAndInterpolation) -> 'DraftResizedCrop':
        new = cls.__new__(cls)
        new.__dict__.update(crop.__dict__)
        return new

    def _draw(self, img: Image.Image) -> Tuple[int, int, int, int, int]:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        mode = (random.choice(self.interpolation)
                if isinstance(self.interpolation, (tuple, list)) else self.interpolation)
        return i, j, h, w, pil_modes_mapping[mode]

    def plan(self, img: Image.Image) -> None:
        """Draw the crop of `img` (not decoded yet) and ask a JPEG decoder for the smallest
        scale that keeps the crop at least the output size; the crop rides in `img.info`."""
        i, j, h, w, resample = self._draw(img)
        width, height = img.size
        out_h, out_w = self.size
        reduce = max((r for r in (8, 4, 2, 1) if w // r >= out_w and h // r >= out_h),
                     default=1)
        if reduce > 1:
            img.draft(img.mode, (math.ceil(width / reduce), math.ceil(height / reduce)))
        img.info[_PLAN_KEY] = (i, j, h, w, resample, width, height)

    def __call__(self, img: Image.Image) -> Image.Image:
        planned: Optional[tuple] = img.info.pop(_PLAN_KEY, None)
        if planned is None:
            planned = (*self._draw(img), *img.size)
        i, j, h, w, resample, width, height = planned
        sx, sy = img.size[0] / width, img.size[1] / height  # < 1 after a draft
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        return img.resize(self.size[::-1], resample, box=box)


class ToNormalizedTensor:
    """ToTensor + Normalize in fewer passes: the uint8 pixels are copied once into a float CHW
    tensor, then shifted and scaled in place ((x - 255 mean) / (255 std), the same values)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        with warnings.catch_warnings():  # the array is read once, never written
            warnings.simplefilter('ignore', UserWarning)
            pixels = torch.from_numpy(np.asarray(img))
        pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
        out = torch.empty(pixels.shape[2], pixels.shape[0], pixels.shape[1])
        out.copy_(pixels.permute(2, 0, 1))
        return out.sub_(self.mean).mul_(self.scale)

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def crop_planner(transform: Callable) -> Optional[Callable[[Image.Image], None]]:
    """The `plan` of a transform whose first step is a `DraftResizedCrop`, else None."""
    steps = getattr(transform, 'transforms', [transform])
    return steps[0].plan if steps and isinstance(steps[0], DraftResizedCrop) else None


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
    transform = pillow_safe(create_transform(
        data.input_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
        color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
        interpolation=data.interpolation, mean=mean, std=std,
        re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count))
    steps = transform.transforms
    if type(steps[0]) is RandomResizedCropAndInterpolation:
        steps[0] = DraftResizedCrop.like(steps[0])
    for k in range(len(steps) - 1):
        if isinstance(steps[k], MaybeToTensor) and isinstance(steps[k + 1], T.Normalize):
            steps[k:k + 2] = [ToNormalizedTensor(mean, std)]
            break
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep <= 0:  # every bit dropped: black, as Pillow < 13 made it
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def pillow_safe(transform: Callable) -> Callable:
    """timm's RandAugment/AugMix posterize with 0 bits kept (magnitude 10, which
    rand-m9-mstd0.5 reaches in about one draw in 44) gives a black image on Pillow < 13 and
    raises ValueError on Pillow 13: with two of fifteen ops per image, each applied with
    probability 0.5, a DeiT-recipe run stops within about its first thousand images. Swap in
    a posterize that keeps the old result. Returns `transform`, changed."""
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
    steps.append(ToNormalizedTensor(mean, std))
    if is_training and aug.re_prob > 0:
        steps.append(RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count,
                                   device='cpu'))
    return T.Compose(steps)
