"""DINO's multi-crop views (Caron et al., 2021): two global crops and N local crops of one image.

Each crop has its own output size (global 224 px from 40-100% of the image, local 96 px from
5-40% for ImageNet), so one image becomes a list of tensors of two resolutions; the default
collate stacks them into a list of batches, one per crop. The randomness comes from Python's
`random` and torch's global generator, as in timm's and torchvision's transforms, so
`SeededTransform` makes every crop of every sample a function of its (index, seed) key.
"""
from typing import List, Sequence

import torch
from PIL import ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def _photometric(in_chans: int, blur: float, solarize: float) -> List:
    """DINO's photometric augmentation of one crop: flip, colour jitter (p=0.8) and grayscale
    (p=0.2), Gaussian blur with probability `blur`, solarisation with probability `solarize`.

    Gray images get the brightness and contrast part of the jitter: without it the student can
    match the teacher by the crops' intensity statistics instead of their content."""
    colour = in_chans == 3
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1) if colour else T.ColorJitter(0.4, 0.4)
    steps = [T.RandomHorizontalFlip(), T.RandomApply([jitter], p=0.8)]
    if colour:
        steps.append(T.RandomGrayscale(p=0.2))
    if blur > 0:
        steps.append(T.RandomApply([_Blur()], p=blur))
    if solarize > 0:
        steps.append(T.RandomSolarize(128, p=solarize))
    return steps


class _Blur:
    """PIL Gaussian blur with a random radius in [0.1, 2] x the crop's size / 224 (DINO's
    range at 224 px, scaled so that small crops are blurred alike)."""

    def __call__(self, img):
        radius = float(torch.empty(1).uniform_(0.1, 2.0)) * min(img.size) / 224
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class MultiCrop:
    """Image in, `[global_1, global_2, local_1, ..., local_n]` normalised tensors out.

    The first global crop is always blurred, the second blurred with probability 0.1 and
    solarised with probability 0.2, local crops blurred with probability 0.5 (DINO's recipe).

    Args:
        global_size: output side of the two global crops, in pixels.
        local_size: output side of the local crops.
        local_crops: number of local crops (0: global crops only).
        global_scale: (min, max) image-area fraction of a global crop.
        local_scale: (min, max) image-area fraction of a local crop.
        mean, std: per-channel normalisation; their length is the channel count.
        interpolation: resize interpolation name, e.g. 'bicubic'.
    """

    def __init__(self, global_size: int, local_size: int, local_crops: int,
                 global_scale: Sequence[float], local_scale: Sequence[float],
                 mean: Sequence[float], std: Sequence[float], interpolation: str = 'bicubic'):
        mode = InterpolationMode(interpolation)
        chans = len(mean)
        finish = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]

        def crop(size, scale, blur, solarize):
            return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), interpolation=mode),
                              *_photometric(chans, blur, solarize), *finish])

        self.globals = [crop(global_size, global_scale, 1.0, 0.0),
                        crop(global_size, global_scale, 0.1, 0.2)]
        self.local = crop(local_size, local_scale, 0.5, 0.0)
        self.local_crops = local_crops

    def __call__(self, img) -> List[torch.Tensor]:
        return [t(img) for t in self.globals] + [self.local(img) for _ in range(self.local_crops)]
