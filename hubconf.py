"""torch.hub entry points: `torch.hub.load('<owner>/conformer-zoo', 'conformer_small_patch16')`.

Every variant registered with timm by `import conformer` is exposed under its timm name;
keyword arguments go to `timm.create_model` (pretrained=True, num_classes=..., ...).
"""
from functools import partial

import timm

import conformer  # noqa: F401  (registers the variants)

dependencies = ['torch', 'timm']

for _name in timm.list_models('conformer_*'):
    globals()[_name] = partial(timm.create_model, _name)
del _name
