"""Model, data loaders, optimizer and schedule from a config: shared by train and eval."""
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set

import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

import conformer  # noqa: F401  (registers the conformer_* variants with timm)
from conformer.data import GlobalBatchSampler, SeededTransform, ShardSampler, build_transform
from conformer.runtime import available_cores
from conformer.weights import weights_file

_logger = logging.getLogger(__name__)
# where a training checkpoint keeps its EMA weights: timm's key, which
# timm.models.load_checkpoint(use_ema=True) reads; files written before used 'ema'
EMA_KEY, OLD_EMA_KEY = 'state_dict_ema', 'ema'
ARCH_KEYS = ('stem_type', 'patch_size', 'base_channel', 'channel_ratio', 'embed_dim', 'depth',
             'num_heads', 'mlp_ratio')


def model_kwargs(model_cfg) -> dict:
    """The architecture settings that override the variant's defaults.

    Args:
        model_cfg: the ``model`` config group; unset (None) settings are left out.
    """
    return {k: model_cfg[k] for k in ARCH_KEYS if model_cfg[k] is not None}


def explicit_keys(cfg) -> Optional[Set[str]]:
    """The keys set on the command line, from Hydra's record of it (`model=...` sets
    model.name); None for a config composed without that record."""
    task = OmegaConf.select(cfg, 'hydra.overrides.task')
    if task is None and HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
    if task is None:
        return None
    keys = {override.split('=', 1)[0].lstrip('+~') for override in task}
    return keys | ({'model.name'} if 'model' in keys else set())


def recorded_settings(record: Dict[str, Any]) -> Dict[str, Any]:
    """The config values a weights record (conformer.weights.weights_record, or a training
    checkpoint's meta) gives: model name, architecture, input channels, preprocessing."""
    values = {'model.name': record['variant']}
    if record.get('in_chans'):
        values['data.in_chans'] = record['in_chans']
    values.update({f'model.{k}': (record.get('model_kwargs') or {}).get(k) for k in ARCH_KEYS})
    size = record.get('input_size')
    if isinstance(size, (list, tuple)) and size[-1] == size[-2]:  # timm's (chans, H, W)
        size = size[-1]
    if isinstance(size, int):
        values['data.input_size'] = size
    values.update({f'data.{k}': record[k] for k in ('interpolation', 'crop_pct')
                   if record.get(k) is not None})
    values.update({f'data.{k}': list(record[k]) for k in ('mean', 'std')
                   if record.get(k) and len(record[k]) == record.get('in_chans')})
    return values


def describe_from_weights(cfg, key: str, record: Dict[str, Any]) -> None:
    """Set the model, architecture, input channels and preprocessing to what the weights that
    `key` names were trained with, except the keys set on the command line: those win, and
    one that differs from the record is named in a warning."""
    explicit = explicit_keys(cfg)
    taken = []
    for name, value in recorded_settings(record).items():
        current = OmegaConf.select(cfg, name)
        if OmegaConf.is_config(current):
            current = OmegaConf.to_container(current)
        if current == value:
            continue
        if explicit is None or name in explicit:
            _logger.warning('%s=%s is not what %s=%s was trained with (%s); kept, as set',
                            name, current, key, OmegaConf.select(cfg, key), value)
        elif name.startswith('data.') and name[5:] in ('mean', 'std') and \
                len(value) != OmegaConf.select(cfg, 'data.in_chans'):
            continue  # per-channel values for another channel count, set explicitly
        else:
            OmegaConf.update(cfg, name, value)
            taken.append(f'{name}={value}')
    if taken:
        _logger.info('from %s=%s: %s', key, OmegaConf.select(cfg, key), ', '.join(taken))


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads: `threads`, else the cores this process may use (its CPU
    affinity: a container's or a job's share, not the whole machine), unless OMP_NUM_THREADS
    sets them (torchrun sets it to 1 for several processes per node).

    Args:
        threads: the thread count; None means the cores this process may use.
    """
    if threads is None and 'OMP_NUM_THREADS' in os.environ:
        return
    torch.set_num_threads(threads or available_cores())


def build_model(model_cfg, num_classes: int, in_chans: int,
                checkpoint: Optional[Path] = None) -> nn.Module:
    """timm.create_model; pretrained weights come from the variant's default source or, with
    model.checkpoint, from weights of any supported format: a file, a model folder, a URL or an
    ``hf-hub:`` name (a new head is made when the class count differs).

    Args:
        model_cfg: the ``model`` config group (name, pretrained, checkpoint, drop rates,
            architecture overrides).
        num_classes: classes of the data.
        in_chans: input channels of the data.
        checkpoint: the local file model.checkpoint was already fetched to (`checkpoint_file`),
            so that a remote source is fetched and verified once per run.

    Raises:
        FileNotFoundError: ``model.checkpoint`` is a local path that does not exist.
        DownloadError: ``model.checkpoint`` cannot be fetched.
    """
    kwargs = model_kwargs(model_cfg)
    overlay = None
    if model_cfg.checkpoint:
        overlay = dict(file=str(checkpoint or checkpoint_file(model_cfg.checkpoint)))
    return timm.create_model(
        model_cfg.name, pretrained=model_cfg.pretrained or overlay is not None,
        pretrained_cfg_overlay=overlay,
        num_classes=num_classes, in_chans=in_chans, drop_rate=model_cfg.drop_rate,
        drop_path_rate=model_cfg.drop_path_rate, **kwargs)


def checkpoint_file(source: str) -> Path:
    """model.checkpoint as a local file: a path as given, or a model folder, URL,
    ``hf-hub:ORG/NAME`` or ``local-dir:FOLDER`` fetched (and cached) as the tools' --checkpoint.

    Raises:
        FileNotFoundError: a local path that does not exist.
        DownloadError: a remote source that cannot be fetched (offline, not cached).
    """
    path = weights_file(source)
    if not path.is_file():
        raise FileNotFoundError(f'model.checkpoint={source} does not exist')
    return path


def saved_ema(state: dict) -> Optional[dict]:
    """A training checkpoint's EMA weights, if it has them.

    Args:
        state: the training checkpoint.
    """
    return state.get(EMA_KEY, state.get(OLD_EMA_KEY))


def check_classes(state: dict, origin: str, classes: Sequence[str]) -> None:
    """A checkpoint's heads stand for the classes it was trained on, by name and in order:
    refuse data with other classes, even as many.

    Args:
        state: the training checkpoint, whose meta records its classes.
        origin: how errors name the checkpoint (the setting that named it).
        classes: class names of the configured data.

    Raises:
        ValueError: the classes differ.
    """
    trained = state.get('meta', {}).get('classes')
    if trained is not None and list(trained) != list(classes):
        raise ValueError(f'{origin} was trained on the classes {_listing(trained)}, the '
                         f'configured data has {_listing(classes)}: set data.root / data.classes '
                         f'as in its training run (to train on these classes from its weights, '
                         f'pass the file as model.checkpoint)')


def _listing(names: Sequence[str], shown: int = 12) -> str:
    names = [str(n) for n in names]
    more = f', ... ({len(names)} in all)' if len(names) > shown else ''
    return '[' + ', '.join(names[:shown]) + more + ']'


def head_modules(model: nn.Module) -> Sequence[nn.Module]:
    """The model's classifier heads, as a sequence.

    Args:
        model: a timm model.
    """
    heads = model.get_classifier()
    return heads if isinstance(heads, (tuple, list)) else (heads,)


def freeze_backbone(model: nn.Module) -> None:
    """Linear probe: only the classifier heads train.

    Args:
        model: a timm model; its other parameters get ``requires_grad=False``.
    """
    model.requires_grad_(False)
    for head in head_modules(model):
        head.requires_grad_(True)


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """train() for training; a frozen backbone's blocks stay in eval mode (BN statistics
    fixed, no dropout) while the model itself is in train mode (dual-head outputs).

    Args:
        model: a timm model.
        frozen_backbone: keep every child but the heads in eval mode.
    """
    model.train()
    if frozen_backbone:
        heads = set(head_modules(model))
        for child in model.children():
            if child not in heads:
                child.eval()


def train_loader(dataset, data_cfg, aug_cfg, sampler: GlobalBatchSampler, micro_batch: int,
                 epoch_seed: int, transform: Optional[Callable] = None) -> DataLoader:
    """The training DataLoader: seeded augmentation of each sample (`SeededTransform`).

    Args:
        dataset: the training set.
        data_cfg: the ``data`` config group (num_workers, preprocessing).
        aug_cfg: the ``aug`` config group.
        sampler: yields this rank's (index, augmentation seed) keys.
        micro_batch: images per forward pass.
        epoch_seed: seeds the loader's own generator.
        transform: the training transform, if not the one `aug_cfg` describes (a method's
            views, e.g. DINO's multi-crop).
    """
    if transform is None:
        transform = build_transform(aug_cfg, data_cfg, is_training=True)
    view = SeededTransform(dataset, transform)
    return DataLoader(view, batch_size=micro_batch, sampler=sampler,
                      num_workers=loader_workers(data_cfg), pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(epoch_seed),
                      persistent_workers=False)


def loader_workers(data_cfg) -> int:
    """data.num_workers, at most the cores this process may use: more loader processes than
    cores only take turns with the training threads (PyTorch warns of it at every epoch).
    Augmentation is seeded per sample, so the count never changes what a run computes."""
    return min(data_cfg.num_workers, available_cores())


def eval_loader(dataset, data_cfg, aug_cfg, rank: int, world_size: int) -> DataLoader:
    """The evaluation DataLoader over this rank's shard (`ShardSampler`), eval transform.

    Args:
        dataset: the evaluation set.
        data_cfg: the ``data`` config group (eval_batch_size, num_workers, preprocessing).
        aug_cfg: the ``aug`` config group (its crop style).
        rank: this process's rank.
        world_size: number of ranks.
    """
    view = SeededTransform(dataset, build_transform(aug_cfg, data_cfg, is_training=False))
    return DataLoader(view, batch_size=data_cfg.eval_batch_size,
                      sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=loader_workers(data_cfg), pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))
