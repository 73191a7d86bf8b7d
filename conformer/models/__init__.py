"""Model families; importing this registers every variant with timm."""
from .conformer import Conformer, ConvTransBlock
from .detection import (ConformerFPN, conformer_faster_rcnn, conformer_fpn_backbone,
                        conformer_mask_rcnn)

__all__ = ['Conformer', 'ConvTransBlock', 'ConformerFPN', 'conformer_faster_rcnn',
           'conformer_fpn_backbone', 'conformer_mask_rcnn']
