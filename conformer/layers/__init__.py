"""Building blocks of the Conformer: the CNN bottleneck, the transformer block and the
feature-coupling units that join the two branches."""
from .blocks import (
                     Attention,
                     ConvBlock,
                     FCUDown,
                     FCUUp,
                     KernelLayer,
                     Mlp,
                     TransformerBlock,
                     bn_affine,
)

__all__ = ['Attention', 'ConvBlock', 'FCUDown', 'FCUUp', 'KernelLayer', 'Mlp', 'TransformerBlock',
           'bn_affine']
