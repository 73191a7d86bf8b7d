"""The training loop, readable top to bottom: `train(cfg, run_dir)`.

One optimizer step consumes one global batch (data.batch_size images over all ranks and
accumulation micro-batches). The loss is the paper's: the mean of the CNN head's and the
transformer head's cross-entropies. Checkpoints hold everything the next step depends on
(weights, EMA, optimizer, schedule, scaler, data position, every rank's RNG), so a resumed
run continues exactly where the killed one stopped.
"""
import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from conformer.data import GlobalBatchSampler, build_datasets
from conformer.models import ConvTransBlock
from conformer.runtime import keep_freed_memory
from conformer.weights import load_state_dict_checked
from . import checkpoint as ckpt
from .build import (build_model, eval_loader, freeze_backbone, model_kwargs, set_train_mode,
                    train_loader)
from .config import check
from .distributed import DistEnv, all_sum, barrier, init_distributed, shutdown
from .evaluate import autocast, evaluate, resolve_amp
from .logger import RunLogger

_logger = logging.getLogger(__name__)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def setup_runtime(t, env: DistEnv) -> None:
    if env.device.type == 'cpu':
        keep_freed_memory()
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    # every rank starts from the same weights; per-rank streams (dropout, mixup) then differ
    torch.manual_seed(t.seed)
    random.seed(t.seed + env.rank)
    np.random.seed(t.seed + env.rank)


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


def dual_head_loss(outputs, target, criterion) -> torch.Tensor:
    conv, trans = outputs
    return (criterion(conv.float(), target) + criterion(trans.float(), target)) / 2


def resume_state(cfg, directory: Path) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(path, state) of the checkpoint trainer.resume names, or (None, None) for a new run;
    read and checked before any work, and a new run never overwrites an earlier one's files."""
    resume = cfg.trainer.resume
    if resume == 'auto':
        found = ckpt.latest(directory)
        resume = str(found) if found else None
    elif not resume and any(directory.glob('*.pth')):
        raise FileExistsError(
            f'{directory} already holds the checkpoints of an earlier run, which a new run '
            f'would overwrite; pass trainer.resume=auto to continue that run, or choose another '
            f'run folder (hydra.run.dir=...) to start a new one')
    if not resume:
        return None, None
    state = ckpt.load(resume, 'trainer.resume', ckpt.TRAIN_STATE)
    # the data position (epoch, step in epoch) only means the same images under the same order
    saved = state['sampler']
    for name, key, value in (('global_batch', 'data.batch_size', cfg.data.batch_size),
                             ('repeats', 'aug.repeated_aug', cfg.aug.repeated_aug),
                             ('seed', 'trainer.seed', cfg.trainer.seed)):
        if saved[name] != value:
            raise ValueError(f'trainer.resume={resume} was saved with {key}={saved[name]}, but '
                             f'this run has {key}={value}: its data position would point at '
                             f'other images; resume with {key}={saved[name]}')
    return resume, state


def train(cfg, run_dir: Path) -> Dict[str, Any]:
    """Train as configured; returns the final metrics (also written to run_dir/metrics.json)."""
    check(cfg)
    t, run_dir = cfg.trainer, Path(run_dir)
    resume, state = resume_state(cfg, run_dir / 'checkpoints')
    env = init_distributed(t.device)
    setup_runtime(t, env)
    amp = resolve_amp(t.amp, env.device, 'trainer.amp')
    if cfg.model.sync_bn and env.device.type != 'cuda':
        raise ValueError('model.sync_bn=true needs GPUs (PyTorch has no CPU SyncBatchNorm); '
                         'set model.sync_bn=false on CPU')

    train_set, eval_set, classes = build_datasets(cfg.data)
    per_rank = cfg.data.batch_size // env.world_size
    if cfg.data.batch_size % (env.world_size * t.accum_steps):
        raise ValueError(f'data.batch_size={cfg.data.batch_size} must be divisible by world size '
                         f'x trainer.accum_steps = {env.world_size * t.accum_steps}')
    micro_batch = per_rank // t.accum_steps
    sampler = GlobalBatchSampler(len(train_set), cfg.data.batch_size, env.rank, env.world_size,
                                 seed=t.seed, repeats=cfg.aug.repeated_aug)
    steps_per_epoch = sampler.steps_per_epoch

    model = build_model(cfg.model, len(classes), cfg.data.in_chans)
    if state is not None:  # into the plain module (before wrapping), with a shape check
        ckpt.check_data(state, f'trainer.resume={resume}', len(classes), cfg.data.in_chans)
        recorded = state['sampler'].get('num_samples', len(train_set))
        if recorded != len(train_set):  # the saved data position would mean other images
            raise ValueError(f'trainer.resume={resume} was saved training on {recorded} '
                             f'images, this run has {len(train_set)}: resume with the same '
                             f'data.root, data.classes and data.samples_per_class')
        load_state_dict_checked(model, state['model'], f'trainer.resume={resume}')
    model.set_dual_head_training(True)  # train-mode calls return (conv_logits, trans_logits)
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.sync_bn and env.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None

    # wrap for distribution before the optimizer sees the parameters (fully_shard replaces
    # them); `model` stays the plain module for state dicts and EMA
    trained = model
    if t.fsdp:
        for block in model.children():  # one all-gather per coupled block, as it runs
            if isinstance(block, ConvTransBlock):
                fully_shard(block)
        trained = fully_shard(model)
    elif env.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)

    lr = cfg.optim.lr * (cfg.data.batch_size / cfg.optim.lr_base_batch
                         if cfg.optim.lr_base_batch else 1.)
    optimizer = create_optimizer_v2(model, opt=cfg.optim.name, lr=lr,
                                    weight_decay=cfg.optim.weight_decay,
                                    momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=t.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == 'fp16')

    forward = torch.compile(trained) if t.compile else trained

    mixup = None
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix,
                      prob=cfg.aug.mixup_prob, switch_prob=cfg.aug.mixup_switch_prob,
                      label_smoothing=cfg.aug.label_smoothing, num_classes=len(classes))
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)

    manager = ckpt.CheckpointManager(run_dir / 'checkpoints', t.keep_last)
    logger = RunLogger(run_dir, env.is_main, cfg.logging.tensorboard, cfg.logging.plot)
    meta = dict(variant=cfg.model.name, num_classes=len(classes), in_chans=cfg.data.in_chans,
                classes=list(classes), model_kwargs=model_kwargs(cfg.model),
                input_size=cfg.data.input_size, mean=list(cfg.data.mean), std=list(cfg.data.std),
                interpolation=cfg.data.interpolation,
                # the eval transform: resize + centre crop, or for pad-crop a plain centre crop
                crop_pct=cfg.data.crop_pct if cfg.aug.train_crop == 'rrc' else 1.0)
    step, epoch, start_step, best = 0, 0, 0, -1.0

    if state is not None:
        set_optimizer_state_dict(trained, optimizer, state['optimizer'],
                                 options=StateDictOptions(full_state_dict=True))
        if ema is not None and 'ema' in state:
            ema.module.load_state_dict(state['ema'])
        scheduler.load_state_dict(state['scheduler'])
        scaler.load_state_dict(state['scaler'])
        step, epoch, start_step = state['step'], state['epoch'], state['step_in_epoch']
        best = state['meta']['metrics'].get('best_top1', -1.0)
        rng = state['rng']
        if state['world_size'] == env.world_size:
            ckpt.restore_rng(rng[env.rank])
        else:  # another world size: data order is kept, per-rank random streams restart
            torch.manual_seed(t.seed + step * 1009 + env.rank)
        if env.is_main:
            _logger.info('resumed from %s at epoch %d, step %d', resume, epoch, step)

    def save(next_epoch: int, next_step_in_epoch: int, metrics: Dict[str, float],
             is_best: bool) -> Optional[Path]:
        # collective calls: every rank takes part, rank 0 writes
        model_state = get_model_state_dict(trained, options=FULL)
        optim_state = get_optimizer_state_dict(trained, optimizer, options=FULL)
        rng = [None] * env.world_size
        if env.enabled:
            torch.distributed.all_gather_object(rng, ckpt.capture_rng())
        else:
            rng = [ckpt.capture_rng()]
        path = None
        if env.is_main:
            state = dict(
                model=model_state, meta=dict(meta, epoch=next_epoch, step=step, metrics=metrics),
                optimizer=optim_state, scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                step=step, epoch=next_epoch, step_in_epoch=next_step_in_epoch,
                sampler=dict(seed=t.seed, global_batch=cfg.data.batch_size,
                             repeats=cfg.aug.repeated_aug, num_samples=len(train_set)),
                rng=rng, world_size=env.world_size, config=OmegaConf.to_container(cfg))
            if ema is not None:
                state['ema'] = ema.module.state_dict()
            path = manager.save(state, step, is_best)
        barrier()
        return path

    stop = StopRequested()
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    metrics: Dict[str, float] = {}
    last_path = manager.latest()
    bar = tqdm(total=total_steps, initial=step, disable=not (env.is_main and cfg.logging.progress),
               unit='step', dynamic_ncols=True)
    status = 'finished'
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, start_step)
            loader = train_loader(train_set, cfg.data, cfg.aug, sampler, micro_batch,
                                  epoch_seed=t.seed * 1000 + epoch)
            batches = iter(loader)
            set_train_mode(model, cfg.model.freeze_backbone)
            # running sums since the last log: loss, correct combined/conv/trans, images
            window = torch.zeros(5, dtype=torch.float64)
            nonfinite = False
            tic = time.perf_counter()
            for step_in_epoch in range(start_step, steps_per_epoch):
                for micro in range(t.accum_steps):
                    images, target = next(batches)
                    images = images.to(env.device, non_blocking=True)
                    target = target.to(env.device, non_blocking=True)
                    if cfg.model.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    hard_target = target
                    if mixup is not None:
                        images, target = mixup(images, target)
                    sync = micro == t.accum_steps - 1 or not env.enabled or t.fsdp
                    with (contextlib.nullcontext() if sync else trained.no_sync()):
                        with autocast(env.device, amp):
                            outputs = forward(images)
                        loss = dual_head_loss(outputs, target, criterion)
                        scaler.scale(loss / t.accum_steps).backward()
                    nonfinite |= not math.isfinite(loss.item())
                    with torch.no_grad():
                        conv, trans = (o.float() for o in outputs)
                        window += torch.tensor([
                            loss.item() * len(images),
                            ((conv + trans).argmax(1) == hard_target).sum().item(),
                            (conv.argmax(1) == hard_target).sum().item(),
                            (trans.argmax(1) == hard_target).sum().item(), len(images)],
                            dtype=torch.float64)
                if cfg.optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
                bar.update(1)

                # one collective per step: did any rank see a non-finite loss or a signal?
                flags = all_sum(torch.tensor([float(nonfinite),
                                              float(stop.signal is not None)], dtype=torch.float64))
                if flags[0] > 0:
                    raise FloatingPointError(
                        f'loss became {loss.item()} at epoch {epoch} step {step}; stopped without '
                        f'saving. Last good checkpoint: {last_path or "none yet"}. Lower optim.lr, '
                        f'set optim.clip_grad, or try trainer.amp=none, then resume with '
                        f'trainer.resume={last_path or "<checkpoint>"}')
                end_of_epoch = step_in_epoch + 1 == steps_per_epoch
                if step % cfg.logging.every_steps == 0 or end_of_epoch or step == total_steps:
                    sums = all_sum(window.clone())
                    seen = max(sums[4].item(), 1.)
                    elapsed = time.perf_counter() - tic
                    record = dict(epoch=epoch, loss=sums[0].item() / seen,
                                  top1=100 * sums[1].item() / seen,
                                  top1_conv=100 * sums[2].item() / seen,
                                  top1_trans=100 * sums[3].item() / seen,
                                  lr=optimizer.param_groups[-1]['lr'],
                                  images_per_s=seen / max(elapsed, 1e-9))
                    logger.log('train', step, **record)
                    bar.set_postfix(epoch=epoch, loss=f'{record["loss"]:.3f}',
                                    acc=f'{record["top1"]:.1f}', img_s=f'{record["images_per_s"]:.0f}')
                    window.zero_()
                    tic = time.perf_counter()
                if stop.signal is not None or flags[1] > 0:
                    last_path = save(*((epoch + 1, 0) if end_of_epoch else (epoch, step_in_epoch + 1)),
                                     metrics, False)
                    status = 'interrupted'
                    break
                if step == total_steps or end_of_epoch:
                    break
                if t.ckpt_every_steps and step % t.ckpt_every_steps == 0:
                    last_path = save(epoch, step_in_epoch + 1, metrics, False)
            del batches, loader
            if status == 'interrupted':
                break
            finished_epoch = step_in_epoch + 1 == steps_per_epoch
            next_epoch, start_step = (epoch + 1, 0) if finished_epoch else (epoch, step_in_epoch + 1)
            if finished_epoch and ((epoch + 1) % t.eval_every == 0) or step == total_steps:
                metrics = run_eval(cfg, env, amp, model, ema, eval_set, epoch, step, logger)
                headline = metrics['ema_top1'] if ema is not None else metrics['top1']
                is_best = headline > best
                best = max(best, headline)
                metrics['best_top1'] = best
                if env.is_main:
                    bar.write(f'epoch {epoch} step {step}: eval top-1 {metrics["top1"]:.2f}%'
                              + (f', EMA {metrics["ema_top1"]:.2f}%' if ema is not None else ''))
                last_path = save(next_epoch, start_step, metrics, is_best)
            elif finished_epoch or step == total_steps:
                last_path = save(next_epoch, start_step, metrics, False)
            epoch = next_epoch
    finally:
        bar.close()
        stop.restore()
        logger.close()

    result = dict(status=status, epoch=epoch, step=step, checkpoint=str(last_path),
                  run_dir=str(run_dir), **metrics)
    if env.is_main:
        (run_dir / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
    shutdown()
    return result


def run_eval(cfg, env: DistEnv, amp: str, model, ema, eval_set, epoch: int, step: int,
             logger: RunLogger) -> Dict[str, float]:
    loader = eval_loader(eval_set, cfg.data, cfg.aug, env.rank, env.world_size)
    with unsharded(model):
        metrics = evaluate(model, loader, env.device, amp, cfg.model.channels_last)
    if ema is not None:
        ema_metrics = evaluate(ema.module, loader, env.device, amp, cfg.model.channels_last)
        metrics.update({f'ema_{k}': v for k, v in ema_metrics.items() if k != 'count'})
    logger.log('eval', step, epoch=epoch, **metrics)
    return metrics
