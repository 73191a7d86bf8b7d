"""Supervised training, the paper's: both heads learn the labels (the mean of their
cross-entropies), with mixup/cutmix and label smoothing from the `aug` group; evaluated by
top-1 of the summed logits on the eval split."""
import contextlib
from typing import Any, Dict, Optional

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..build import eval_loader, freeze_backbone
from ..evaluate import autocast, correct_counts, dual_head_loss, evaluate
from .base import Method


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Gather FSDP2-sharded parameters for the duration: evaluation calls the model's
    submodules directly, which bypasses the hooks that gather them in a normal forward."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


class Supervised(Method):
    """Labels train both heads; the window sums the correct predictions of the summed logits
    and of each head."""
    name = 'supervised'
    sums = ('top1', 'top1_conv', 'top1_trans')

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mixup: Optional[Mixup] = None
        self.criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)

    def attach(self, model: nn.Module, saved: Optional[Dict[str, Any]], origin: str) -> nn.Module:
        aug = self.cfg.aug
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix,
                               prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob,
                               label_smoothing=aug.label_smoothing, num_classes=model.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        model.set_dual_head_training(True)  # train-mode calls return (conv_logits, trans_logits)
        if self.cfg.model.freeze_backbone:
            freeze_backbone(model)
        return model

    def step(self, run, state, batch):
        images, target = batch
        device = run.env.device
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if self.cfg.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard_target = target
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        with autocast(device, run.amp):
            outputs = run.forward(images)
        loss = dual_head_loss(outputs, target, self.criterion)
        with torch.no_grad():
            conv, trans = (o.float() for o in outputs)
            correct = correct_counts(conv, trans, hard_target)
        return loss, len(hard_target), 100 * correct

    def evaluate(self, run, epoch: int, step: int) -> Dict[str, float]:
        return run_eval(run.cfg, run.env, run.amp, run.model, run.ema, run.eval_set, epoch, step,
                        run.logger)

    def headline(self, metrics: Dict[str, float]) -> float:
        return metrics['ema_top1'] if 'ema_top1' in metrics else metrics['top1']


def run_eval(cfg, env, amp: str, model, ema, eval_set, epoch: int, step: int,
             logger) -> Dict[str, float]:
    """Top-1 of the model and its EMA on the eval split (BatchNorm statistics already averaged
    over ranks by the loop), logged."""
    loader = eval_loader(eval_set, cfg.data, cfg.aug, env.rank, env.world_size)
    with unsharded(model):
        metrics = evaluate(model, loader, env.device, amp, cfg.model.channels_last)
    if ema is not None:
        ema_metrics = evaluate(ema.module, loader, env.device, amp, cfg.model.channels_last)
        metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if k != 'count'})
    logger.log('eval', step, epoch=epoch, **metrics)
    return metrics
