"""Model families; importing this registers every variant with timm."""
from .conformer import Conformer, ConvTransBlock

__all__ = ['Conformer', 'ConvTransBlock']
