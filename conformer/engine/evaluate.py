"""Evaluation: top-1 of the summed logits (the paper's metric) and of each head, summed over
ranks, and `evaluate_checkpoint` behind conformer-eval.

conformer-eval takes a training checkpoint, any local weights file, or the variant's pretrained
download. A training checkpoint describes itself: the model, its architecture, input channels,
preprocessing and classes come from its record, unless set on the command line.
"""
import contextlib
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from conformer import runtime
from conformer.data import build_datasets
from conformer.weights import load_state_dict_checked

from .build import (
    build_model,
    check_classes,
    describe_from_weights,
    eval_loader,
    saved_ema,
    set_threads,
)
from .checkpoint import check_data, load
from .config import check
from .distributed import all_sum, init_distributed

_logger = logging.getLogger(__name__)


def resolve_amp(amp: str, device: torch.device, key: str = 'amp') -> str:
    """The autocast a run uses for its ``amp`` setting on ``device``: ``'auto'`` is bf16 where
    the device has native bf16 and fp32 (``'none'``) elsewhere; the others are kept, with a
    warning for bf16 that the device can only emulate.

    Args:
        amp: 'auto', 'bf16', 'fp16' or 'none'.
        device: the device the run uses.
        key: names the setting in messages.

    Raises:
        ValueError: fp16 on a device other than CUDA.
    """
    if amp == 'fp16' and device.type != 'cuda':
        raise ValueError(f'{key}=fp16 needs a GPU (CPUs have no fast fp16 path); use '
                         f'{key}=auto, or {key}=bf16 on a CPU with native bf16')
    if amp == 'auto':
        amp = 'bf16' if runtime.native_bf16(device) else 'none'
        _logger.info('%s=auto: %s', key, 'bf16 autocast' if amp == 'bf16' else
                     f'fp32 (this {device.type} has no native bf16; emulated bf16 is slower)')
    elif amp == 'bf16' and not runtime.native_bf16(device):
        warnings.warn(f'{key}=bf16 on a {device.type} without native bf16: PyTorch emulates it, '
                      f'several times slower than fp32; set {key}=auto (or none) to run in fp32',
                      stacklevel=2)
    return amp


def autocast(device: torch.device, amp: str):
    """The autocast context for a resolved ``amp`` setting (a no-op for 'none').

    Args:
        device: the device the model runs on.
        amp: 'bf16', 'fp16' or 'none', as from `resolve_amp`.
    """
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def dual_head_loss(outputs: Tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
                   criterion: Callable = F.cross_entropy) -> torch.Tensor:
    """The paper's training loss: the mean of the CNN head's and the transformer head's losses.

    Args:
        outputs: (conv_logits, trans_logits); the loss is computed in fp32 whatever their dtype.
        target: class indices, or soft targets for a soft-target criterion (mixup).
        criterion: the per-head loss, e.g. label-smoothed cross-entropy.
    """
    conv, trans = outputs
    return (criterion(conv.float(), target) + criterion(trans.float(), target)) / 2


def correct_counts(conv: torch.Tensor, trans: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Correct predictions of the summed logits (the paper's metric), of the CNN head and of the
    transformer head, as one tensor on the logits' device.

    Args:
        conv: the CNN head's logits (B, classes).
        trans: the transformer head's logits (B, classes).
        target: class indices (B,).
    """
    return torch.stack([(conv + trans).argmax(1) == target, conv.argmax(1) == target,
                        trans.argmax(1) == target]).sum(1)


def head_logits(model: nn.Module, images: torch.Tensor):
    """(conv_logits, trans_logits) in any mode, through the model's public API.

    Args:
        model: a Conformer with classifier heads.
        images: the input batch.
    """
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    conv_head, trans_head = model.get_classifier()
    split = conv_head.in_features
    return conv_head(pooled[:, :split]), trans_head(pooled[:, split:])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str,
             channels_last: bool = False, num_classes: Optional[int] = None,
             progress: bool = False) -> Dict[str, Any]:
    """Loss and top-1 (summed heads, each head) over `loader`, summed over ranks; the model's
    train/eval mode is restored afterwards.

    Args:
        model: a Conformer with classifier heads.
        loader: yields (images, class indices); under DDP, each rank's shard.
        device: where the model is.
        amp: 'bf16', 'fp16' or 'none', as from `resolve_amp`.
        channels_last: feed the images in channels_last layout.
        num_classes: also count top-5 and the confusion matrix of the summed heads over
            this many classes (conformer-eval); None keeps the loop lean (training).
        progress: show a progress bar (on stderr).

    Returns:
        ``loss`` (mean of both heads' cross-entropies), ``top1``, ``top1_conv``,
        ``top1_trans`` (percent) and ``count``; with `num_classes` also ``top5`` (percent,
        top-k for fewer than 5 classes) and ``confusion`` (rows: true class, columns:
        predicted class, image counts).

    Raises:
        ValueError: the evaluation set is empty.
    """
    was_training = model.training
    model.eval()
    # sums on the device: loss, correct (combined), correct conv head, correct transformer
    # head, count, correct in the top 5; read once at the end
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    confusion = (torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
                 if num_classes else None)
    summed_cross_entropy = partial(F.cross_entropy, reduction='sum')
    for images, target in tqdm(loader, desc='evaluating', unit='batch', disable=not progress,
                               dynamic_ncols=True, leave=False):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            conv, trans = head_logits(model, images)
        conv, trans = conv.float(), trans.float()
        totals[0] += dual_head_loss((conv, trans), target, summed_cross_entropy)
        totals[1:4] += correct_counts(conv, trans, target)
        totals[4] += len(target)
        if confusion is not None:
            logits = conv + trans
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals[5] += (top == target[:, None]).any(1).sum()
            confusion.view(-1).index_add_(
                0, target * num_classes + logits.argmax(1),
                torch.ones(len(target), dtype=torch.float64, device=device))
    model.train(was_training)
    loss, correct, conv_correct, trans_correct, count, top5 = all_sum(totals).tolist()
    if count == 0:
        raise ValueError('the evaluation set is empty')
    result = dict(loss=loss / count, top1=100 * correct / count,
                  top1_conv=100 * conv_correct / count, top1_trans=100 * trans_correct / count,
                  count=int(count))
    if confusion is not None:
        result.update(top5=100 * top5 / count,
                      confusion=all_sum(confusion).round().long().tolist())
    return result


def per_class_accuracy(confusion: List[List[int]], classes: Sequence[str]) -> Dict[str, float]:
    """Top-1 (percent) of each class from a confusion matrix; None for a class without images.

    Args:
        confusion: rows: true class, columns: predicted class.
        classes: the class names, in index order.
    """
    return {name: (100 * row[i] / sum(row) if sum(row) else None)
            for i, (name, row) in enumerate(zip(classes, confusion))}


def plot_confusion(confusion: List[List[int]], classes: Sequence[str], path: Path,
                   title: str) -> None:
    """The confusion matrix as a PNG, each row normalised to the share of its class's images
    (counts in the cells while there are at most 30 classes).

    Args:
        confusion: rows: true class, columns: predicted class.
        classes: the class names.
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    counts = torch.tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(shares.numpy(), cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class's images")
    if n <= 30:
        ax.set_xticks(range(n), labels=classes, rotation=90)
        ax.set_yticks(range(n), labels=classes)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha='center', va='center', fontsize=7,
                            color='white' if shares[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted class', ylabel='true class', title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(cfg) -> Dict[str, Any]:
    """Top-1 (summed heads, each head) and loss of the configured weights on the eval split.

    Args:
        cfg: an `EvalConfig` (conformer-eval's config).
    """
    state = load(cfg.checkpoint, 'checkpoint', required=('model',)) if cfg.checkpoint else None
    if state is not None and 'variant' in state.get('meta', {}):
        describe_from_weights(cfg, 'checkpoint', state['meta'])
    check(cfg)
    set_threads(cfg.threads)
    env = init_distributed(cfg.device, 'device')
    amp = resolve_amp(cfg.amp, env.device)
    _, eval_set, classes = build_datasets(cfg.data)
    if state is not None and select_trained_classes(cfg, state, classes):
        _, eval_set, classes = build_datasets(cfg.data)
    model = build_model(cfg.model, len(classes), cfg.data.in_chans)
    if state is not None:
        origin = f'checkpoint={cfg.checkpoint}'
        check_data(state, origin, len(classes), cfg.data.in_chans)
        check_classes(state, origin, classes)
        ema = saved_ema(state) if cfg.use_ema else None
        weights = ema if ema is not None else state['model']
        load_state_dict_checked(model, weights, origin)
    model.to(env.device)
    loader = eval_loader(eval_set, cfg.data, cfg.aug, env.rank, env.world_size)
    result = evaluate(model, loader, env.device, amp, num_classes=len(classes),
                      progress=env.is_main)
    return dict(result, checkpoint=cfg.checkpoint, device=str(env.device),
                split=cfg.data.eval_split, classes=list(classes),
                per_class_top1=per_class_accuracy(result['confusion'], classes))


def select_trained_classes(cfg, state: Dict[str, Any], classes: List[str]) -> bool:
    """With data.classes unset, keep the classes the checkpoint was trained on when the data
    has them all (under other indices); True when data.classes was set.

    Args:
        cfg: the config; its ``data.classes`` may be set.
        state: the training checkpoint, whose meta records its classes.
        classes: the class names of the configured data.
    """
    trained = state.get('meta', {}).get('classes')
    if cfg.data.classes is not None or not trained or list(trained) == list(classes) \
            or not set(trained) <= set(classes):
        return False
    cfg.data.classes = [classes.index(name) for name in trained]
    return True
