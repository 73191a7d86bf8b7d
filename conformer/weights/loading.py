"""Load weights into a Conformer from any source, and route timm's pretrained loading here.

`load_weights(model, source)` is the direct call; `timm.create_model(..., pretrained=True)`
reaches the same code through `install_timm_loader`. timm's own loader fetches URLs without
checking the sha256 in their names, ignores our training checkpoints' ``'ema'`` entry and
reports damaged files as bare ``OSError``/unpickling errors, so for Conformer models (and only
those) timm's ``load_pretrained`` step is replaced: timm still resolves where the weights come
from (``state_dict`` > ``file`` > ``hf_hub_id`` > ``url``, ``hf-hub:`` / ``local-dir:`` names),
then this package fetches and reads the file, the model's ``checkpoint_filter_fn`` maps keys,
heads and stem, and the result is loaded with a shape check that explains what does not fit.
That step is private to timm: pyproject.toml keeps timm in the 1.0 series, and a timm that
changed the step is left alone with a warning (see `install_timm_loader`).
"""
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import LocalEntryNotFoundError
from timm.models import _builder, _factory

from conformer.models import Conformer
from conformer.models.conformer import STEM_STRIDES, checkpoint_filter_fn

from .download import DownloadError, fetch_hf, fetch_url, find_weights_file
from .reader import Checkpoint, CheckpointError, read_checkpoint

__all__ = ['weights_file', 'load_weights', 'load_state_dict_checked', 'architecture',
           'architecture_differences', 'describe_architecture', 'install_timm_loader']

_logger = logging.getLogger(__name__)

# the parameters of the timm step replaced for Conformer models (timm.models._builder)
TIMM_LOADER_PARAMS = ('model', 'pretrained_cfg', 'num_classes', 'in_chans', 'filter_fn', 'strict',
                      'cache_dir')

StateDict = Dict[str, torch.Tensor]
FilterFn = Callable[[StateDict, torch.nn.Module], StateDict]

# wrappers around the paper's key names: DDP, torch.compile, mmpretrain
_KEY_PREFIXES = ('module.', '_orig_mod.', 'backbone.', 'head.')
# dimensions of the tensors whose shapes tell the architecture (conv weights, a linear head)
_DIMS = {'conv1.weight': 4, 'trans_patch_conv.weight': 4, 'conv_1.conv3.weight': 4,
         'conv_cls_head.weight': 2}


def weights_file(source: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """A local weight file for `source`, downloading it first if needed.

    Args:
        source: a file, a model folder, ``local-dir:FOLDER``, ``hf-hub:ORG/NAME[@REVISION]``
            or an http(s) URL (downloaded, hash-checked, cached).
        cache_dir: where downloads are kept; None means the default cache of the source
            (torch.hub's for URLs, the Hugging Face cache for ``hf-hub:``).

    Raises:
        DownloadError: the source cannot be fetched.
        CheckpointError: a folder holds no single weight file.
    """
    source = str(source)
    for kind in ('hf-hub', 'local-dir'):
        if source.startswith(kind + ':'):
            return _fetch(kind, source[len(kind) + 1:], cache_dir)
    return _fetch('url' if '://' in source else 'file', source, cache_dir)


def _fetch(load_from: str, location: Any, cache_dir: Optional[Union[str, Path]]) -> Path:
    if load_from == 'hf-hub':
        # timm passes (hub id, file name) when the cfg names the file
        return fetch_hf(*location if isinstance(location, tuple) else (location,),
                        cache_dir=cache_dir)
    if load_from == 'url':
        return fetch_url(location, cache_dir)
    path = Path(location).expanduser()
    return find_weights_file(path) if load_from == 'local-dir' or path.is_dir() else path


def load_weights(model: Conformer, source: Union[str, Path], use_ema: bool = True,
                 strict: bool = True, cache_dir: Optional[Union[str, Path]] = None) -> Checkpoint:
    """Load weights from `source` in any supported format into `model`.

    Args:
        model: the Conformer to load into.
        source: where the weights are, as for `weights_file`.
        use_ema: take the EMA weights when the file holds both.
        strict: refuse missing and unknown keys (else load the rest, with a warning).
        cache_dir: where downloads are kept, as for `weights_file`.

    Returns:
        What was read (file, format, wrapper key used, recorded meta).

    Raises:
        CheckpointError: the file is damaged or its weights do not fit `model`.
        DownloadError: the source cannot be fetched.
    """
    checkpoint = read_checkpoint(weights_file(source, cache_dir), use_ema=use_ema)
    load_state_dict_checked(model, checkpoint.state_dict, str(checkpoint.path), strict=strict)
    return checkpoint


def load_pretrained_cfg(model: Conformer, pretrained_cfg: Optional[Dict[str, Any]] = None,
                        filter_fn: Optional[FilterFn] = None, strict: bool = True,
                        cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Load the weights a timm pretrained_cfg points at (what `pretrained=True` does).

    Args:
        model: the Conformer to load into.
        pretrained_cfg: timm's pretrained config; None means `model.pretrained_cfg`.
        filter_fn: maps the file's keys onto `model`; None means `checkpoint_filter_fn`.
        strict: refuse missing and unknown keys (else load the rest, with a warning).
        cache_dir: where downloads are kept.
    """
    cfg = pretrained_cfg or model.pretrained_cfg
    load_from, location = _builder._resolve_pretrained_source(cfg)
    if load_from == 'state_dict':
        state_dict, origin = location, 'the state_dict in pretrained_cfg'
    elif load_from:
        _logger.info(f'Loading pretrained weights from {load_from} {location}')
        checkpoint = read_checkpoint(_fetch(load_from, location, cache_dir))
        state_dict, origin = checkpoint.state_dict, str(checkpoint.path)
    else:
        raise RuntimeError(
            f"{cfg.get('architecture')} has no pretrained weights; use pretrained=False, a tag "
            f"with weights (timm.list_pretrained('conformer*')), or your own file with "
            f"pretrained_cfg_overlay=dict(file=PATH)")
    load_state_dict_checked(model, state_dict, origin, strict=strict,
                            filter_fn=filter_fn or checkpoint_filter_fn)


def load_state_dict_checked(model: torch.nn.Module, state_dict: StateDict, origin: str,
                            strict: bool = True,
                            filter_fn: FilterFn = checkpoint_filter_fn) -> None:
    """Map a file's `state_dict` (any key layout) onto `model` with `filter_fn`, then
    `model.load_state_dict` with errors that say which weights do not fit and why.

    The errors describe the file's own weights, not the mapped ones (whose stem and heads
    the filter may have fitted to the model). BatchNorm's `num_batches_tracked` counters may
    be absent (some converters drop them). Integer or boolean tensors where the model has
    floating-point ones, and tensors of another number of dimensions, are refused.

    Args:
        model: the model to load into.
        state_dict: the weights as the file holds them.
        origin: how errors name the weights (a path, or the setting that named it).
        strict: refuse missing and unknown keys (else load the rest, with a warning).
        filter_fn: maps the file's keys, heads and stem onto `model`.
    """
    own = model.state_dict()
    _check_dtypes_and_dims(state_dict, own, origin)
    file_state_dict, state_dict = state_dict, filter_fn(state_dict, model)
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        differences = architecture_differences(file_state_dict, model)
        settings = (f' the model has {"; ".join(differences)}. Set these to the weights\' '
                    f'values (model.<key>= for conformer-train/-eval, --model-args KEY=VALUE '
                    f"for the other tools), or leave them unset to take the variant's;"
                    if differences else '')  # the settings first, then the tensors they shape
        raise CheckpointError(
            f'{origin}: the weights are for another Conformer variant;{settings} '
            f'{len(mismatched)} tensors differ in shape:\n{_listing(mismatched)}\n'
            f'file:  {describe_architecture(file_state_dict)}\n'
            f'model: {describe_architecture(model)}\n'
            f'Create the variant the weights were trained for.')
    missing = [k for k in own if k not in state_dict and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        if not set(state_dict) & set(own):
            raise CheckpointError(
                f'{origin}: holds no Conformer weights (none of its {len(file_state_dict)} '
                f'keys, e.g. {sorted(file_state_dict)[:3]}, is a Conformer parameter)')
        detail = (f'{len(missing)} model keys missing from the file {missing[:5]}, '
                  f'{len(unexpected)} file keys unknown to the model {unexpected[:5]}')
        if strict:
            raise CheckpointError(f'{origin}: the weights do not fit the model: {detail}; '
                                  f'pass strict=False (pretrained_strict=False) to load the rest')
        _logger.warning(f'{origin}: loaded non-strictly: {detail}')
    model.load_state_dict(state_dict, strict=False)


def _check_dtypes_and_dims(state_dict: StateDict, own: StateDict, origin: str) -> None:
    """Refuse, before any mapping, file tensors no mapping can fix: integers or booleans where
    the model has floating-point weights (loading would cast them), and tensors flattened or
    reshaped to another number of dimensions."""
    integer_names = {k.rsplit('.', 1)[-1] for k, v in own.items() if not v.is_floating_point()}
    not_floating = [(k, v.dtype, 'floating point') for k, v in state_dict.items()
                    if not v.is_floating_point() and k.rsplit('.', 1)[-1] not in integer_names]
    if not_floating:
        raise CheckpointError(
            f'{origin}: {len(not_floating)} weights are stored as integers or booleans where '
            f'the model has floating-point ones:\n{_listing(not_floating)}\nThe file was '
            f'converted or exported with the wrong dtype; use the original floating-point '
            f'weights.')
    plain = plain_keys(state_dict)
    reshaped = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in plain.items()
                if k in own and v.dim() != own[k].dim()]
    if reshaped:
        raise CheckpointError(
            f'{origin}: {len(reshaped)} tensors have another number of dimensions than the '
            f"model's:\n{_listing(reshaped)}\nThe file was flattened or reshaped when it was "
            f'written; save model.state_dict() as it is.')


def _listing(rows: List[Tuple[str, Any, Any]]) -> str:
    """'  key: file A, model B' lines, at most eight of them."""
    lines = '\n'.join(f'  {k}: file {a}, model {b}' for k, a, b in rows[:8])
    return lines + (f'\n  ... and {len(rows) - 8} more' if len(rows) > 8 else '')


# hyper-parameters `architecture` reads from the shapes, in the model's keyword names
SHAPE_KEYS = ('base_channel', 'channel_ratio', 'embed_dim', 'depth', 'mlp_ratio')


def architecture(weights: Union[StateDict, torch.nn.Module]) -> Dict[str, Any]:
    """The Conformer hyper-parameters a model's or a state_dict's shapes show (paper,
    mmpretrain or DDP keys): `SHAPE_KEYS`, ``token_stride`` (the patch embedding's stride on
    the stem's output), ``stem_kernel`` (7 for the 'imagenet' stem), ``in_chans`` and
    ``num_classes``. num_heads cannot be seen, nor whether a 3x3 stem pools.

    Args:
        weights: a model or a state_dict.

    Raises:
        KeyError: not in the Conformer layout.
    """
    state_dict = plain_keys(weights.state_dict() if isinstance(weights, torch.nn.Module)
                            else weights)
    stem, patch = state_dict['conv1.weight'], state_dict['trans_patch_conv.weight']
    first, head = state_dict['conv_1.conv3.weight'], state_dict.get('conv_cls_head.weight')
    fc1 = next((state_dict[k] for k in ('trans_1.mlp.fc1.weight', 'trans_1.ffn.layers.0.0.weight')
                if k in state_dict), None)
    return dict(base_channel=stem.shape[0], channel_ratio=first.shape[0] // stem.shape[0],
                embed_dim=patch.shape[0],
                depth=1 + len({k.split('.')[0] for k in state_dict if k.startswith('conv_trans_')}),
                mlp_ratio=fc1.shape[0] / patch.shape[0] if fc1 is not None else None,
                token_stride=patch.shape[-1], stem_kernel=stem.shape[-1], in_chans=stem.shape[1],
                num_classes=head.shape[0] if head is not None else 0)


def architecture_differences(file_state_dict: StateDict, model: torch.nn.Module) -> List[str]:
    """'key=<model's> (the weights have <file's>)' for each hyper-parameter in which a model
    and a file's weights differ; [] when the shapes do not tell (another layout)."""
    try:
        file, own = architecture(file_state_dict), architecture(model)
    except KeyError:
        return []
    differences = [f'{k}={own[k]} (the weights have {file[k]})' for k in SHAPE_KEYS
                   if file[k] is not None and file[k] != own[k]]
    if (file['token_stride'], file['stem_kernel']) != (own['token_stride'], own['stem_kernel']):
        patch_size = getattr(model, 'patch_size', '?')
        differences.append(f'stem_type/patch_size (the model: patch_size={patch_size}; the '
                           f'weights: {describe_architecture(file_state_dict).split(", base")[0]})')
    return differences


def describe_architecture(weights: Union[StateDict, torch.nn.Module]) -> str:
    """The Conformer hyper-parameters a model's or a state_dict's shapes imply (paper,
    mmpretrain or DDP keys).

    num_heads cannot be seen, nor in a state_dict the stem's max pool: 'small' and 'pooled'
    stems have the same parameters, so both readings are given.

    Args:
        weights: a model or a state_dict.
    """
    state_dict = plain_keys(weights.state_dict() if isinstance(weights, torch.nn.Module)
                            else weights)
    reshaped = [f'{k} {tuple(v.shape)}' for k, v in state_dict.items()
                if k in _DIMS and v.dim() != _DIMS[k]]
    if reshaped:
        return f'not in the Conformer layout (reshaped: {", ".join(reshaped)})'
    try:
        arch = architecture(state_dict)
    except KeyError:
        return 'not in the Conformer layout'
    token_stride = arch['token_stride']
    if isinstance(weights, Conformer):  # a model knows its stem
        stem_types = {stride: name for name, stride in STEM_STRIDES.items()}
        stem_and_patch = (f'stem_type={stem_types[weights.patch_size // token_stride]}, '
                          f'patch_size={weights.patch_size}')
    elif arch['stem_kernel'] == 7:
        stem_and_patch = f'stem_type=imagenet, patch_size={4 * token_stride}'
    else:
        stem_and_patch = (f'stem_type=small with patch_size={token_stride} or pooled with '
                          f'patch_size={2 * token_stride}')
    return (f'{stem_and_patch}, base_channel={arch["base_channel"]}, '
            f'channel_ratio={arch["channel_ratio"]}, embed_dim={arch["embed_dim"]}, '
            f'depth={arch["depth"]}, in_chans={arch["in_chans"]}, '
            f'num_classes={arch["num_classes"]}')


def plain_keys(state_dict: StateDict) -> StateDict:
    """`state_dict` without DDP / torch.compile / mmpretrain key prefixes (enough to read
    shapes; `checkpoint_filter_fn` does the full mapping).

    Args:
        state_dict: the weights, under any of those prefixes.
    """
    def strip(key: str) -> str:
        while key.startswith(_KEY_PREFIXES):
            key = key.split('.', 1)[1]
        return key
    return {strip(k): v for k, v in state_dict.items()}


def install_timm_loader() -> None:
    """Make timm's `pretrained=True` load Conformer weights through `load_pretrained_cfg`.

    Other models still go to timm's own `load_pretrained`. Idempotent. The step replaced is
    private to timm (pyproject.toml bounds timm to the 1.0 series, where it is stable); if an
    installed timm changed it, it is left alone and a warning says what that means.
    """
    timm_load_pretrained = getattr(_builder, 'load_pretrained', None)
    if getattr(timm_load_pretrained, 'conformer_zoo', False):
        return
    params = (tuple(inspect.signature(timm_load_pretrained).parameters)
              if callable(timm_load_pretrained) else None)
    if params != TIMM_LOADER_PARAMS or not hasattr(_builder, '_resolve_pretrained_source'):
        warnings.warn(
            f'timm {timm.__version__} changed the private loading step conformer-zoo routes '
            f'Conformer weights through (timm.models._builder.load_pretrained{params or ""}), so '
            f"timm.create_model(..., pretrained=True) loads them with timm's own loader, "
            f'without the hash, damage and NaN checks; conformer.weights.load_weights(model, '
            f'source) still makes them. Install a timm this release supports: '
            f'pip install "timm>=1.0,<1.1"', RuntimeWarning, stacklevel=2)
        return

    def load_pretrained(model, pretrained_cfg=None, num_classes=1000, in_chans=3,
                        filter_fn=None, strict=True, cache_dir=None):
        if isinstance(model, Conformer):
            # heads and stem are fitted to the model by checkpoint_filter_fn, so timm's
            # num_classes / in_chans arguments are not needed
            return load_pretrained_cfg(model, pretrained_cfg, filter_fn=filter_fn,
                                       strict=strict, cache_dir=cache_dir)
        return timm_load_pretrained(model, pretrained_cfg, num_classes, in_chans, filter_fn,
                                    strict, cache_dir)

    install_hub_config_loader()
    load_pretrained.__doc__ = timm_load_pretrained.__doc__
    load_pretrained.__wrapped__ = timm_load_pretrained
    load_pretrained.conformer_zoo = True
    _builder.load_pretrained = load_pretrained


def install_hub_config_loader() -> None:
    """Make `timm.create_model('hf-hub:ORG/NAME')` say what to do when the repo's config.json
    is neither cached nor reachable (offline, no network), naming the repo, instead of
    huggingface_hub's generic message. Idempotent; other errors pass as they are."""
    timm_load_config = getattr(_factory, 'load_model_config_from_hf', None)
    if timm_load_config is None or getattr(timm_load_config, 'conformer_zoo', False):
        return

    def load_model_config_from_hf(model_id, *args, **kwargs):
        try:
            return timm_load_config(model_id, *args, **kwargs)
        except LocalEntryNotFoundError as e:
            cache = kwargs.get('cache_dir') or hf_constants.HF_HUB_CACHE
            repo = str(model_id).partition('@')[0]
            raise DownloadError(
                f'hf-hub:{model_id}: its config.json is not in the Hugging Face cache ({cache}) '
                f'and the Hub cannot be reached or HF_HUB_OFFLINE is set; run once with network '
                f'access, or on another machine `hf download {repo}` and copy that cache over, '
                f'or pass a local copy (local-dir:FOLDER)') from e

    load_model_config_from_hf.__wrapped__ = timm_load_config
    load_model_config_from_hf.conformer_zoo = True
    _factory.load_model_config_from_hf = load_model_config_from_hf
