"""conformer-zoo: the Conformer CNN-Transformer hybrid as a timm-native backbone.

`import conformer` registers every variant with timm, so `timm.create_model('conformer_...')`
and `timm.list_models('conformer*')` work.
"""
from .models import Conformer
from . import weights  # routes timm's pretrained=True for Conformer models through it

__version__ = '0.1.0'
__all__ = ['Conformer', '__version__']
