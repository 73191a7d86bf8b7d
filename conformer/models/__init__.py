"""Model families; importing this registers every variant with timm."""
from .conformer import Conformer, ConvTransBlock, check_model_name
from .detection import (
    ConformerFPN,
    conformer_faster_rcnn,
    conformer_fpn_backbone,
    conformer_mask_rcnn,
)

__all__ = ['Conformer', 'ConvTransBlock', 'check_model_name', 'ConformerFPN',
           'conformer_faster_rcnn', 'conformer_fpn_backbone', 'conformer_mask_rcnn']
