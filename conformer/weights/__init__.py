"""Pretrained weights for Conformer models: find, fetch, read safely, convert, publish.

Importing this package (``import conformer`` does) routes ``timm.create_model(...,
pretrained=True)`` for Conformer models through it; see `loading` for why. Sources: the
``.in1k`` tags (mmpretrain's conversions of the paper's ImageNet weights, hash-checked),
``pretrained_cfg_overlay=dict(file=...)``, ``hf-hub:`` and ``local-dir:`` model names, or
`load_weights(model, source)` directly; `model_from_weights(source)` builds the model the
weights were trained as (for inference tools). File formats: see `reader`.
"""
from .download import (
    DownloadError,
    default_cache_dir,
    fetch_hf,
    fetch_url,
    find_weights_file,
    sha256_file,
)
from .loading import (
    describe_architecture,
    install_timm_loader,
    load_state_dict_checked,
    load_weights,
    weights_file,
)
from .reader import EMA_KEYS, MODEL_KEYS, Checkpoint, CheckpointError, read_checkpoint, read_file
from .rebuild import known_release, model_from_weights

install_timm_loader()

__all__ = ['Checkpoint', 'CheckpointError', 'DownloadError', 'EMA_KEYS', 'MODEL_KEYS',
           'default_cache_dir', 'describe_architecture', 'fetch_hf', 'fetch_url',
           'find_weights_file', 'known_release', 'load_state_dict_checked', 'load_weights',
           'model_from_weights', 'read_checkpoint', 'read_file', 'sha256_file', 'weights_file']
