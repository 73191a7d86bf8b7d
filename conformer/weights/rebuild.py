"""Rebuild the Conformer a weights file was trained as, for tools that run it as it was trained.

`load_weights` fits weights into a model the caller created; inference tools (predict, export,
visualize) and `conformer-convert` instead need the model the file describes: its variant,
architecture overrides, class count and input channels, and the preprocessing and class names
it was trained with. These come from what the file and its folder record: conformer-train's
``meta``, the ``config.json`` conformer-convert (timm's ``save_for_hf``) writes beside
``model.safetensors``, and the shapes of the weights themselves.
"""
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from conformer.models import check_model_name

from .download import DownloadError, fetch_hf
from .loading import (
    SHAPE_KEYS,
    architecture,
    describe_architecture,
    load_state_dict_checked,
    plain_keys,
    weights_file,
)
from .reader import Checkpoint, CheckpointError, read_checkpoint

__all__ = ['model_from_weights', 'known_release', 'variants_of_shape', 'weights_record']

_logger = logging.getLogger(__name__)


def model_from_weights(source: Union[str, Path], model_name: Optional[str] = None,
                       use_ema: bool = True, num_classes: Optional[int] = None,
                       cache_dir: Optional[Union[str, Path]] = None,
                       model_kwargs: Optional[Dict[str, Any]] = None
                       ) -> Tuple[nn.Module, Checkpoint]:
    """Build the Conformer the weights at `source` were trained as and load them (eval mode),
    for tools that run them: predict, export, visualize, conformer-convert.

    num_classes and in_chans come from the weights' heads and stem, architecture overrides
    (stem_type, patch_size, ...) from the record.

    ``model.pretrained_cfg`` carries the recorded preprocessing (``input_size`` with the
    weights' channel count, ``mean``, ``std``, ``interpolation``, ``crop_pct``: use
    ``timm.data.resolve_data_config({}, model=model)``) and, when recorded, the class names
    as ``label_names``.

    Args:
        source: a weight file (any supported format), a model folder, an http(s) URL,
            ``hf-hub:ORG/NAME`` or ``local-dir:FOLDER``.
        model_name: the variant; None means the hosted ``.in1k`` release the file is, else the
            one recorded by the training run or by the ``config.json`` beside the file, else
            one named in the file name.
        use_ema: take the EMA weights when the file holds both.
        num_classes: None takes the trained count; given, it is checked against it, or 0
            builds a model returning pooled features; any other count is refused, as fresh
            heads predict noise.
        cache_dir: where downloads are kept.
        model_kwargs: architecture settings (embed_dim=..., num_heads=...) the weights were
            trained with, over what they record: weights without a record of another
            architecture than their variant's default need them.

    Returns:
        The model and what was read (file, format, weights key, meta).

    Raises:
        CheckpointError: weights it cannot use (a ValueError).
        ValueError: an unknown `model_name`.
        DownloadError: a source it cannot fetch.
    """
    checkpoint, record = weights_record(source, model_name, use_ema, cache_dir)
    name, release = record['variant'], record['release']
    variant = name.split('.')[0]
    trained_classes, in_chans = record['num_classes'], record['in_chans']
    if num_classes not in (None, 0, trained_classes):
        trained = (f'were trained for {trained_classes} classes' if trained_classes
                   else 'have no classifier heads')
        raise CheckpointError(
            f'{checkpoint.path}: the weights {trained}, so a model with {num_classes} classes '
            f'would predict with untrained heads; omit num_classes (or pass {trained_classes})'
            + (', or 0 for pooled features' if trained_classes else ' for pooled features'))
    overrides = {k: v for k, v in dict(record.get('model_kwargs') or {}, **(model_kwargs or {}))
                 .items() if k not in ('num_classes', 'in_chans')}  # these come from the weights
    model = timm.create_model(name, **overrides, in_chans=in_chans,
                              num_classes=trained_classes if num_classes is None else num_classes)
    load_state_dict_checked(model, checkpoint.state_dict, str(checkpoint.path))

    cfg = model.pretrained_cfg
    if release is None or variant != release.split('.')[0]:
        # the variant's default cfg describes other weights: drop its tag, results and origin
        for key in ('tag', 'notes', 'description'):
            cfg.pop(key, None)
    size = record.get('input_size') or cfg['input_size']
    cfg['input_size'] = (in_chans, *((size, size) if isinstance(size, int) else tuple(size)[-2:]))
    cfg.update({k: tuple(record[k]) for k in ('mean', 'std') if record.get(k)})
    for key in ('mean', 'std'):  # unrecorded: the variant's RGB values, averaged for grey
        if len(cfg[key]) != in_chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * in_chans
    cfg.update({k: record[k] for k in ('interpolation', 'crop_pct') if record.get(k)})
    cfg['num_classes'] = model.num_classes
    classes = record.get('classes')
    if classes and len(classes) == model.num_classes:
        cfg['label_names'] = tuple(classes)
    return model.eval(), checkpoint


def weights_record(source: Union[str, Path], model_name: Optional[str] = None,
                   use_ema: bool = True, cache_dir: Optional[Union[str, Path]] = None,
                   file: Optional[Path] = None) -> Tuple[Checkpoint, Dict[str, Any]]:
    """The weights at `source` and what they tell of the model they were trained as, under
    conformer-train's meta names: ``variant`` (`model_name`, else the hosted ``release``, else
    the record, else the file name), ``num_classes`` and ``in_chans`` (from the heads and the
    stem), and as recorded ``model_kwargs``, ``classes``, ``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``.

    Args:
        source: where the weights are, as for `model_from_weights`.
        model_name: the variant, overriding what the weights record.
        use_ema: take the EMA weights when the file holds both.
        cache_dir: where downloads are kept.
        file: the local file `source` was already fetched to (not fetched again).

    Returns:
        (the checkpoint read, the record dict).
    """
    checkpoint = read_checkpoint(file or weights_file(source, cache_dir), use_ema=use_ema)
    record = _record(checkpoint, source, cache_dir)
    release = known_release(checkpoint.path.name)
    name = check_model_name(model_name or release or _recorded_variant(checkpoint, record))
    num_classes, in_chans = _trained_heads_and_stem(checkpoint)
    return checkpoint, dict(record, variant=name, release=release, num_classes=num_classes,
                            in_chans=in_chans)


def known_release(filename: str) -> Optional[str]:
    """The pretrained tag ('conformer_tiny_patch16.in1k') whose hosted file is `filename`.

    Args:
        filename: a file name without folder, e.g. the name of a downloaded file.

    Returns:
        The tag, or None if no hosted release has that file name.
    """
    for name in timm.list_pretrained('conformer*'):
        url = get_pretrained_cfg(name).url
        if url and os.path.basename(url) == filename:
            return name
    return None


def _record(checkpoint: Checkpoint, source: Union[str, Path],
            cache_dir: Optional[Union[str, Path]]) -> Dict[str, Any]:
    """What was recorded about the weights, as conformer-train's meta names it (variant,
    model_kwargs, classes, input_size, mean, std, interpolation, crop_pct): the checkpoint's
    own record, else the
    config.json of a converted folder beside the file (fetched too for ``hf-hub:`` sources)."""
    if checkpoint.architecture:
        return dict(checkpoint.meta, variant=checkpoint.architecture)
    if str(source).startswith('hf-hub:'):
        try:
            fetch_hf(str(source)[len('hf-hub:'):], 'config.json', cache_dir=cache_dir)
        except DownloadError:  # a repo of bare weights: --model names the variant
            pass
    path = checkpoint.path.parent / 'config.json'
    try:
        config = json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{path} (beside the weights) is not valid JSON ({e}); fix it or '
                              f'move it away') from e
    architecture = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(architecture, str) or not architecture.startswith('conformer'):
        return dict(checkpoint.meta)  # no config, or one of another library
    pretrained_cfg = config.get('pretrained_cfg') or {}
    return {'variant': architecture, 'model_kwargs': config.get('model_args') or {},
            'classes': config.get('label_names') or pretrained_cfg.get('label_names'),
            **{k: pretrained_cfg[k] for k in ('input_size', 'mean', 'std', 'interpolation',
                                              'crop_pct') if k in pretrained_cfg}}


def _recorded_variant(checkpoint: Checkpoint, record: Dict[str, Any]) -> str:
    """The variant the record names, else the one the file name contains."""
    conformers = timm.list_models('conformer*')
    recorded = str(record.get('variant') or '').lower().split('.')[0]
    if recorded in conformers:
        return recorded
    in_name = [n for n in conformers if n in checkpoint.path.name.lower()]
    if len(in_name) == 1:
        return in_name[0]
    by_shape = variants_of_shape(checkpoint.state_dict)
    if len(by_shape) == 1:
        _logger.info('%s: no variant recorded; its shapes are those of %s', checkpoint.path,
                     by_shape[0])
        return by_shape[0]
    which = (f'its shapes fit {by_shape}' if by_shape else
             "no variant's default architecture fits its shapes")
    raise CheckpointError(
        f'{checkpoint.path}: cannot tell which Conformer variant these weights are ({which}: '
        f'{describe_architecture(checkpoint.state_dict)}); name the variant and the settings '
        f'it was trained with: --model NAME --model-args KEY=VALUE ... (model_name=, '
        f'model_kwargs=), one of {conformers}')


def variants_of_shape(state_dict: Dict[str, Any]) -> List[str]:
    """The registered variants whose default architecture has the shapes of `state_dict`
    (any class count and input channels); num_heads and whether a 3x3 stem pools cannot be
    seen, so variants differing only in those would all be listed."""
    try:
        weights = architecture(state_dict)
    except KeyError:
        return []
    keys = [k for k in (*SHAPE_KEYS, 'token_stride', 'stem_kernel') if weights[k] is not None]
    found = []
    for name in timm.list_models('conformer*'):
        with torch.device('meta'):  # shapes only: no memory, no initialisation
            model = timm.create_model(name, num_classes=weights['num_classes'],
                                      in_chans=weights['in_chans'])
        own = architecture(model)
        if all(own[k] == weights[k] for k in keys):
            found.append(name)
    return found


def _trained_heads_and_stem(checkpoint: Checkpoint) -> Tuple[int, int]:
    """num_classes (0 without heads) and in_chans the weights were trained with."""
    plain = plain_keys(checkpoint.state_dict)
    head, stem = plain.get('conv_cls_head.weight'), plain.get('conv1.weight')
    for key, tensor, dims, expected in (
            ('conv_cls_head.weight', head, 2, '(num_classes, features)'),
            ('conv1.weight', stem, 4, '(channels, in_chans, k, k)')):
        if tensor is not None and tensor.dim() != dims:
            raise CheckpointError(
                f'{checkpoint.path}: {key!r} has shape {tuple(tensor.shape)}, where a '
                f"Conformer's is {expected}: the file was flattened or reshaped when it was "
                f'written; save model.state_dict() as it is')
    return (head.shape[0] if head is not None else 0), (stem.shape[1] if stem is not None else 3)
