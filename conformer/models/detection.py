"""Faster R-CNN and Mask R-CNN on a Conformer + FPN backbone, as in the paper's COCO setup.

The paper's detectors (an mmdetection fork) feed the CNN branch's maps after blocks 4, 8, 11
and 12 (strides 4, 8, 16, 32: the model's `feature_info` taps) into a 256-channel FPN with a
max-pooled fifth level, and keep BatchNorm statistics frozen while fine-tuning
(mmdetection's `norm_eval`). The builders below assemble the same detectors from torchvision.

torchvision's default detection heads already match that mmdetection config: RPN anchors of
32-512 px, one size per FPN level, at ratios 0.5/1/2; RoIAlign over levels '0'-'3' (7x7 for
boxes, 14x14 for masks); a two-layer 1024-wide box head and a four-conv mask head. So the
builders pass only the backbone and the Conformer's input normalisation; every other
`FasterRCNN` / `MaskRCNN` argument (e.g. `min_size`, `max_size`, which default to COCO's
800/1333) goes through `**kwargs`.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Type

import timm
import torch
from timm.models import group_parameters, split_model_name_tag
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .conformer import Conformer, ConvTransBlock

__all__ = ['ConformerFPN', 'conformer_fpn_backbone', 'conformer_faster_rcnn',
           'conformer_mask_rcnn']

# the strides the detection heads' anchor sizes and RoI levels are laid out for
DETECTION_STRIDES = [4, 8, 16, 32]


class ConformerFPN(nn.Module):
    """A Conformer's four CNN-branch taps through an FPN, as torchvision's detectors expect.

    `forward(images)` returns an OrderedDict of `out_channels`-channel maps keyed '0'-'3'
    (strides 4-32) and 'pool' (stride 64). The transformer branch still runs, since it feeds
    the CNN branch through the coupling units, but only CNN maps leave the backbone.

    Args:
        body: the Conformer; this module takes it over and removes its classifier heads and
            final norm, which detection never uses (unused parameters break DDP).
        out_channels: FPN width (256 in the paper).
        norm_eval: keep every BatchNorm of `body` in eval mode even under `train()`: detection
            batches are a few images per device, too few for useful batch statistics, so
            the pretrained running statistics stay fixed while the affine weights still train.
            A randomly initialised backbone has no statistics worth keeping: pass False.
        trainable_blocks: train only the last this many of the `depth` coupled blocks; the
            stem and earlier blocks get `requires_grad=False` and frozen BatchNorm statistics.
            None trains everything.
    """

    def __init__(self, body: Conformer, out_channels: int = 256, norm_eval: bool = True,
                 trainable_blocks: Optional[int] = None):
        super().__init__()
        if not isinstance(body, Conformer):
            raise TypeError(f'ConformerFPN needs a conformer.models.Conformer body, got '
                            f'{type(body).__name__}; build one with timm.create_model('
                            f"'conformer_small_patch32') or use conformer_fpn_backbone()")
        strides = [info['reduction'] for info in body.feature_info]
        if strides != DETECTION_STRIDES:
            raise ValueError(
                f'the detection backbone needs CNN-branch taps at strides {DETECTION_STRIDES}, '
                f"but this Conformer has them at {strides}; use stem_type='imagenet' "
                f'(the stride-4 stem)')
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f'out_channels must be a positive integer, got {out_channels!r}')
        depth = 1 + sum(isinstance(m, ConvTransBlock) for m in body.children())
        if trainable_blocks is not None and (
                not isinstance(trainable_blocks, int) or not 0 <= trainable_blocks <= depth):
            raise ValueError(f'trainable_blocks must be an integer from 0 (freeze the whole '
                             f'Conformer) to its depth {depth} (freeze only the stem), or None '
                             f'to train everything; got {trainable_blocks!r}')
        body.prune_intermediate_layers(len(DETECTION_STRIDES), prune_norm=True, prune_head=True)
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            [info['num_chs'] for info in body.feature_info], out_channels,
            extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.norm_eval = norm_eval
        if trainable_blocks is not None:
            self._freeze_first_blocks(depth - trainable_blocks)
        self.train(self.training)  # modules start in training mode: apply norm_eval now

    def _freeze_first_blocks(self, num_blocks: int) -> None:
        """Freeze the stem and blocks 1..num_blocks of the (pruned) body."""
        # the model's own layer grouping (used for layer-wise lr decay): 0 = stem, i = block i
        params = dict(self.body.named_parameters())
        for group_id, names in group_parameters(self.body, self.body.group_matcher()).items():
            if group_id <= num_blocks:
                for name in names:
                    params[name].requires_grad_(False)

    def train(self, mode: bool = True) -> 'ConformerFPN':
        """`nn.Module.train`, keeping the BatchNorms that `norm_eval` or freezing fix in eval mode.

        Args:
            mode: training mode (True) or eval mode.
        """
        super().train(mode)
        for m in self.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                    self.norm_eval or not m.weight.requires_grad):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def conformer_fpn_backbone(variant: str = 'conformer_small_patch32', pretrained: bool = False,
                           out_channels: int = 256, norm_eval: bool = True,
                           trainable_blocks: Optional[int] = None,
                           **model_kwargs: Any) -> ConformerFPN:
    """Create a registered Conformer variant and wrap it in a `ConformerFPN`.

    Args:
        variant: a registered Conformer variant; may carry a pretrained tag, e.g.
            'conformer_small_patch32.in1k'.
        pretrained: load the variant's pretrained weights.
        out_channels: FPN width, as for `ConformerFPN`.
        norm_eval: keep BatchNorm statistics frozen, as for `ConformerFPN`.
        trainable_blocks: coupled blocks left trainable, as for `ConformerFPN`.
        **model_kwargs: go to `timm.create_model`.

    Raises:
        ValueError: `variant` is not a registered Conformer variant.
    """
    variants = timm.list_models('conformer_*')
    if split_model_name_tag(variant)[0] not in variants:
        raise ValueError(f'unknown Conformer variant {variant!r}; choose one of {variants} '
                         f'(the paper detects with conformer_small_patch32)')
    body = timm.create_model(variant, pretrained=pretrained, **model_kwargs)
    return ConformerFPN(body, out_channels=out_channels, norm_eval=norm_eval,
                        trainable_blocks=trainable_blocks)


def _build_detector(detector_cls: Type[FasterRCNN], num_classes: Optional[int], variant: str,
                    pretrained_backbone: bool, backbone_kwargs: Optional[Dict[str, Any]],
                    kwargs: Dict[str, Any]) -> FasterRCNN:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f'num_classes counts the background class too: for K object classes '
                         f"pass K + 1 (91 for COCO in torchvision's numbering); "
                         f'got {num_classes!r}')
    backbone = conformer_fpn_backbone(variant, pretrained_backbone, **(backbone_kwargs or {}))
    cfg = backbone.body.pretrained_cfg
    kwargs = {'image_mean': list(cfg['mean']), 'image_std': list(cfg['std']), **kwargs}
    return detector_cls(backbone, num_classes, **kwargs)


def conformer_faster_rcnn(num_classes: Optional[int],
                          variant: str = 'conformer_small_patch32',
                          pretrained_backbone: bool = False,
                          backbone_kwargs: Optional[Dict[str, Any]] = None,
                          **kwargs: Any) -> FasterRCNN:
    """torchvision Faster R-CNN on a Conformer + FPN backbone (paper, S/32: 43.1 box AP, COCO 1x).

    Args:
        num_classes: object classes plus the background (91 for COCO in torchvision's
            numbering); None when `kwargs` holds a `box_predictor` (torchvision's rule).
        variant: the Conformer variant, optionally with a pretrained tag.
        pretrained_backbone: load the variant's pretrained weights into the backbone.
        backbone_kwargs: go to `conformer_fpn_backbone` (out_channels, norm_eval,
            trainable_blocks, Conformer kwargs).
        **kwargs: go to `FasterRCNN`.
    """
    return _build_detector(FasterRCNN, num_classes, variant, pretrained_backbone,
                           backbone_kwargs, kwargs)


def conformer_mask_rcnn(num_classes: Optional[int],
                        variant: str = 'conformer_small_patch32',
                        pretrained_backbone: bool = False,
                        backbone_kwargs: Optional[Dict[str, Any]] = None,
                        **kwargs: Any) -> MaskRCNN:
    """torchvision Mask R-CNN on a Conformer + FPN backbone (paper, S/32: 43.6 AP, COCO 1x).

    Args:
        num_classes: object classes plus the background; as for `conformer_faster_rcnn`.
        variant: the Conformer variant, optionally with a pretrained tag.
        pretrained_backbone: load the variant's pretrained weights into the backbone.
        backbone_kwargs: go to `conformer_fpn_backbone`.
        **kwargs: go to `MaskRCNN`.
    """
    return _build_detector(MaskRCNN, num_classes, variant, pretrained_backbone,
                           backbone_kwargs, kwargs)
