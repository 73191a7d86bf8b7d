"""The training loop, readable top to bottom: `train(cfg, run_dir)`.

One optimizer step consumes one global batch (data.batch_size images over all ranks and
accumulation micro-batches). What is learnt comes from the run's method
(`conformer.engine.methods`): supervised, the paper's loss (the mean of the CNN head's and the
transformer head's cross-entropies), or self-supervised DINO; the loop, its checkpoints, logs,
resume and distribution are the same for both. Checkpoints hold everything the next step
depends on (weights, EMA, the method's state, optimizer, schedule, scaler, data position,
every rank's RNG), so a resumed run continues exactly where the killed one stopped.
"""
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from conformer.data import GlobalBatchSampler, build_datasets
from conformer.models import ConvTransBlock
from conformer.runtime import keep_freed_memory
from conformer.weights import CheckpointError, load_state_dict_checked
from conformer.weights.rebuild import weights_record

from . import checkpoint as ckpt
from .build import (
    EMA_KEY,
    build_model,
    check_classes,
    checkpoint_file,
    describe_from_weights,
    model_kwargs,
    saved_ema,
    set_threads,
    set_train_mode,
    train_loader,
)
from .config import check
from .distributed import (
    DistEnv,
    all_sum,
    barrier,
    distribute_bn,
    init_distributed,
    launched_rank,
    shutdown,
)
from .evaluate import resolve_amp
from .logger import RunLogger
from .methods import Method, build_method

_logger = logging.getLogger(__name__)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
RUN_LOCK = 'run.lock'


class RunFolderInUse(OSError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def own_run_folder(run_dir: Path):
    """Hold an exclusive lock on `run_dir` while a run trains there, so that two runs never
    interleave their checkpoints and logs. The lock file holds the owner's PID; the kernel
    drops the lock when the process ends, however it ends."""
    path = run_dir / RUN_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise RunFolderInUse(
                f'{run_dir} is in use by another training run (PID {holder}); wait for it to '
                f'end or stop it, or train in another folder (hydra.run.dir=...)') from None
        try:  # the file a finishing owner removed is no lock: take the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    try:
        yield
    finally:
        os.unlink(path)  # while still holding the lock
        os.close(fd)


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
    set_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    # every rank starts from the same weights; per-rank streams (dropout, mixup) then differ
    torch.manual_seed(t.seed)
    random.seed(t.seed + env.rank)
    np.random.seed(t.seed + env.rank)


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
    refuse_changed_settings(cfg, resume, state)
    return resume, state


FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
# settings the saved optimizer state would override: a resume refuses changes to them
OPTIMIZER_SETTINGS = ('optim.name', 'optim.lr', 'optim.lr_base_batch', 'optim.weight_decay',
                      'optim.momentum', 'optim.layer_decay', 'model.freeze_backbone')
# settings of the learning-rate schedule: a resume with changes to them follows the new one
SCHEDULE_SETTINGS = ('trainer.epochs', 'sched.name', 'sched.warmup_epochs', 'sched.warmup_lr',
                     'sched.min_lr')


def changed_settings(cfg, state: Dict[str, Any], keys: Sequence[str]) -> List[str]:
    """'key: saved -> configured' for each of `keys` that differs from the checkpoint's config
    (none for checkpoints written before they recorded it)."""
    if 'config' not in state:
        return []
    saved = OmegaConf.create(state['config'])
    return [f'{key}: {OmegaConf.select(saved, key)} -> {OmegaConf.select(cfg, key)}'
            for key in keys if OmegaConf.select(saved, key) != OmegaConf.select(cfg, key)]


def refuse_changed_settings(cfg, resume: str, state: Dict[str, Any]) -> None:
    changed = changed_settings(cfg, state, OPTIMIZER_SETTINGS)
    if changed:
        raise ValueError(f'trainer.resume={resume} was trained with other optimizer settings, '
                         f'which its saved optimizer state would override: {"; ".join(changed)}. '
                         f'Resume with the saved values, or start a new run from its weights '
                         f'(model.checkpoint={resume}, another hydra.run.dir)')


@dataclass
class Run:
    """Everything a run is built from (phase one); fixed while it trains."""
    cfg: Any
    run_dir: Path
    env: DistEnv
    amp: str
    model: nn.Module  # the plain module: state dicts, EMA and evaluation read it
    method: Method  # what the run learns: its step, extra state and evaluation
    trained: nn.Module  # what the optimizer steps: the method's network, or its DDP/FSDP2 wrapper
    forward: Callable  # `trained`, compiled with trainer.compile
    ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_set: Any
    eval_set: Any
    sampler: GlobalBatchSampler
    micro_batch: int
    total_steps: int
    manager: ckpt.CheckpointManager
    logger: RunLogger
    meta: Dict[str, Any]  # what a checkpoint says about the model and its data


@dataclass
class RunState:
    """Where the run stands; a checkpoint records it and resuming restores it."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # steps of `epoch` taken
    best: float = -1.0  # best headline eval top-1 so far
    checkpoint: Optional[Path] = None  # the latest checkpoint saved
    metrics: Dict[str, float] = field(default_factory=dict)  # the latest evaluation
    status: str = 'finished'  # or 'interrupted'


class MetricWindow:
    """Training sums since the last log, kept on the device: adding to them never waits for
    the device; reading them (`totals`) is a host sync. The loss, the images and the count of
    non-finite losses come first, then the method's own per-image sums (`Method.sums`)."""
    LOSS, IMAGES, NONFINITE, METHOD = range(4)

    def __init__(self, device: torch.device, method_sums: int = 0):
        self.sums = torch.zeros(self.METHOD + method_sums, dtype=torch.float64, device=device)
        self.tic, self.cpu_tic = time.perf_counter(), time.process_time()
        self.windows = 0  # logged so far
        self.warned = False

    @torch.no_grad()
    def add(self, loss: torch.Tensor, images: int, method_sums: torch.Tensor) -> None:
        self.sums[self.LOSS] += loss.detach().double() * images
        self.sums[self.IMAGES] += images
        self.sums[self.NONFINITE] += ~torch.isfinite(loss.detach())
        self.sums[self.METHOD:] += method_sums.double()

    def totals(self) -> List[float]:
        """The sums over all ranks. HOST SYNC."""
        return all_sum(self.sums.clone()).tolist()

    def reset(self) -> None:
        self.sums.zero_()
        self.tic, self.cpu_tic = time.perf_counter(), time.process_time()

    def cores_used(self) -> float:
        """This process's CPU time per second since the reset: the cores it got."""
        return (time.process_time() - self.cpu_tic) / max(time.perf_counter() - self.tic, 1e-9)


def train(cfg, run_dir: Path) -> Dict[str, Any]:
    """Train as configured; returns the final metrics (also written to run_dir/metrics.json).

    Args:
        cfg: a `TrainConfig` (conformer-train's config).
        run_dir: the run's folder for checkpoints, logs and metrics
            (``trainer.resume=auto`` resumes from its last checkpoint).
    """
    pretrained = describe_from_pretrained(cfg)
    check(cfg)
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as cleanup:  # undoes what it is given, last first
        if launched_rank() == 0:  # rank 0 writes the run's files
            run_dir.mkdir(parents=True, exist_ok=True)
            cleanup.enter_context(own_run_folder(run_dir))
        resume, saved = resume_state(cfg, run_dir / 'checkpoints')
        if saved is not None and finished(cfg, saved):
            return finished_result(run_dir, resume, saved)
        env = init_distributed(cfg.trainer.device)
        cleanup.callback(shutdown)
        run = build_run(cfg, run_dir, env, resume, saved, pretrained)
        cleanup.callback(run.logger.close)
        state = start_state(run, resume, saved)
        t, steps_per_epoch = cfg.trainer, run.sampler.steps_per_epoch
        window = MetricWindow(env.device, len(run.method.sums))
        stop = StopRequested()
        cleanup.callback(stop.restore)
        bar = cleanup.enter_context(tqdm(
            total=run.total_steps, initial=state.step, unit='step', dynamic_ncols=True,
            disable=not (env.is_main and cfg.logging.progress)))
        while state.step < run.total_steps:
            epoch = state.epoch
            run.sampler.set_epoch(epoch, state.step_in_epoch)
            batches = iter(train_loader(run.train_set, cfg.data, cfg.aug, run.sampler,
                                        run.micro_batch, epoch_seed=t.seed * 1000 + epoch,
                                        transform=run.method.transform()))
            set_train_mode(run.model, cfg.model.freeze_backbone)
            window.reset()
            while True:
                train_step(run, state, batches, window)
                bar.update(1)
                end_of_epoch = state.step_in_epoch == steps_per_epoch
                last_step = state.step == run.total_steps
                if state.step % cfg.logging.every_steps == 0 or end_of_epoch or last_step:
                    log_train(run, state, window, bar)
                if end_of_epoch:
                    state.epoch, state.step_in_epoch = epoch + 1, 0
                if not last_step and stop_requested(stop, env):  # the last one ends as usual
                    save_checkpoint(run, state, window)
                    state.status = 'interrupted'
                    break
                if end_of_epoch or last_step:
                    break
                if t.ckpt_every_steps and state.step % t.ckpt_every_steps == 0:
                    save_checkpoint(run, state, window)
            del batches
            if state.status == 'interrupted':
                break
            if (end_of_epoch and (epoch + 1) % t.eval_every == 0) or last_step:
                evaluate_run(run, state, window, epoch, bar)
            else:
                save_checkpoint(run, state, window)
        result = dict(status=state.status, epoch=state.epoch, step=state.step,
                      checkpoint=str(state.checkpoint), run_dir=str(run_dir), **state.metrics)
        if env.is_main:
            (run_dir / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
        return result


def describe_from_pretrained(cfg) -> Optional[Path]:
    """Fine-tuning from model.checkpoint takes the model, architecture, input channels and
    preprocessing from what the weights record (explicit settings win); returns the local
    file of model.checkpoint, fetched once for the whole run (None without one)."""
    source = cfg.model.checkpoint
    if not source:
        return None
    file = checkpoint_file(source)  # a missing file or an unreachable source is named first
    try:
        record = weights_record(source, file=file)[1]
    except CheckpointError:  # a plain file of a custom architecture: the configured model
        record = weights_record(source, model_name=cfg.model.name, file=file)[1]
    describe_from_weights(cfg, 'model.checkpoint', record)
    return file


def finished(cfg, saved: Dict[str, Any]) -> bool:
    """Has the checkpoint's run taken all the steps this config asks for?"""
    sampler = saved['sampler']
    if 'num_samples' not in sampler:  # written before checkpoints recorded it
        return False
    total = cfg.trainer.epochs * (sampler['num_samples'] // sampler['global_batch'])
    if cfg.trainer.max_steps is not None:
        total = min(total, cfg.trainer.max_steps)
    return saved['step'] >= total


def finished_result(run_dir: Path, resume: str, saved: Dict[str, Any]) -> Dict[str, Any]:
    """A finished run is left as it is: its recorded results, and a word that it is done."""
    _logger.warning('%s finished at step %d: nothing to train, nothing changed. To train it '
                    'further, start a new run from its weights (model.checkpoint=%s, another '
                    'hydra.run.dir)', run_dir, saved['step'], resume)
    try:
        # this folder's checkpoint, also when the folder is a copy of the one that trained
        return dict(json.loads((run_dir / 'metrics.json').read_text()), checkpoint=resume,
                    run_dir=str(run_dir))
    except (OSError, ValueError):  # no summary (another folder's checkpoint, or removed)
        return dict(status='finished', epoch=saved['epoch'], step=saved['step'],
                    checkpoint=resume, run_dir=str(run_dir), **saved['meta']['metrics'])


def fused_update(optimizer: str, device: torch.device, fsdp: bool) -> Dict[str, bool]:
    """torch's fused kernel for Adam, AdamW and SGD: one call updates every parameter. Off the
    GPU torch otherwise loops over the tensors in Python, which costs small models on a CPU
    about a tenth of each step. Sharded (FSDP) parameters keep torch's default."""
    name = optimizer.removeprefix('lookahead_')
    fusable = get_optimizer_class(name, bind_defaults=False) in FUSED_OPTIMIZERS
    return dict(fused=True) if fusable and device.type in ('cpu', 'cuda') and not fsdp else {}


def build_run(cfg, run_dir: Path, env: DistEnv, resume: Optional[str],
              saved: Optional[Dict[str, Any]], pretrained: Optional[Path] = None) -> Run:
    """Data, model (from `pretrained`, model.checkpoint's local file, then the resumed
    weights), wrappers, optimizer, schedule and loss."""
    t = cfg.trainer
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
    sampler = GlobalBatchSampler(len(train_set), cfg.data.batch_size, env.rank, env.world_size,
                                 seed=t.seed, repeats=cfg.aug.repeated_aug)

    method = build_method(cfg)
    model = build_model(cfg.model, method.num_classes(classes), cfg.data.in_chans,
                        pretrained)
    if saved is not None:  # into the plain module (before wrapping), with a shape check
        ckpt.check_data(saved, f'trainer.resume={resume}', method.num_classes(classes),
                        cfg.data.in_chans)
        check_classes(saved, f'trainer.resume={resume}', classes)
        recorded = saved['sampler'].get('num_samples', len(train_set))
        if recorded != len(train_set):  # the saved data position would mean other images
            raise ValueError(f'trainer.resume={resume} was saved training on {recorded} '
                             f'images, this run has {len(train_set)}: resume with the same '
                             f'data.root, data.classes and data.samples_per_class')
        load_state_dict_checked(model, saved['model'], f'trainer.resume={resume}')
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # the network the optimizer trains: the model, or the model and the method's head
    net = method.attach(model, saved, f'trainer.resume={resume}')
    if cfg.model.sync_bn and env.enabled:  # swaps the BN layers in place, `model` included
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(env.device)
    method.to(env.device)
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None

    # wrap for distribution before the optimizer sees the parameters (fully_shard replaces
    # them); `model` stays the plain module for state dicts and EMA
    trained = net
    if t.fsdp:
        for block in model.children():  # one all-gather per coupled block, as it runs
            if isinstance(block, ConvTransBlock):
                fully_shard(block)
        trained = fully_shard(net)
    elif env.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == 'cuda' else None)

    lr = cfg.optim.lr * (cfg.data.batch_size / cfg.optim.lr_base_batch
                         if cfg.optim.lr_base_batch else 1.)
    optimizer = create_optimizer_v2(net, opt=cfg.optim.name, lr=lr,
                                    weight_decay=cfg.optim.weight_decay,
                                    momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay,
                                    **fused_update(cfg.optim.name, env.device, t.fsdp))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched.name, num_epochs=t.epochs, warmup_epochs=cfg.sched.warmup_epochs,
        warmup_lr=cfg.sched.warmup_lr, min_lr=cfg.sched.min_lr, step_on_epochs=False,
        updates_per_epoch=sampler.steps_per_epoch)

    total_steps = t.epochs * sampler.steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    meta = dict(variant=cfg.model.name, num_classes=model.num_classes, in_chans=cfg.data.in_chans,
                classes=list(classes), model_kwargs=model_kwargs(cfg.model),
                input_size=cfg.data.input_size, mean=list(cfg.data.mean), std=list(cfg.data.std),
                interpolation=cfg.data.interpolation,
                # the eval transform: resize + centre crop, or for pad-crop a plain centre crop
                crop_pct=cfg.data.crop_pct if cfg.aug.train_crop == 'rrc' else 1.0)
    return Run(
        cfg=cfg, run_dir=run_dir, env=env, amp=amp, model=model, method=method, trained=trained,
        forward=torch.compile(trained) if t.compile else trained, ema=ema, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler(env.device.type, enabled=amp == 'fp16'),
        train_set=train_set, eval_set=eval_set,
        sampler=sampler, micro_batch=per_rank // t.accum_steps, total_steps=total_steps,
        manager=ckpt.CheckpointManager(run_dir / 'checkpoints', t.keep_last),
        logger=RunLogger(run_dir, env.is_main, cfg.logging.tensorboard, cfg.logging.plot),
        meta=meta)


def start_state(run: Run, resume: Optional[str], saved: Optional[Dict[str, Any]]) -> RunState:
    """A new run's state, or the resumed one's with its optimizer, schedule, EMA and RNG."""
    state = RunState(checkpoint=run.manager.latest())
    if saved is None:
        return state
    # how the update runs is this run's choice, not saved state: a checkpoint of an unsharded
    # run holds fused=True, which sharded (FSDP) parameters refuse for SGD
    kernels = [{k: group[k] for k in ('fused', 'foreach') if k in group}
               for group in run.optimizer.param_groups]
    set_optimizer_state_dict(run.trained, run.optimizer, saved['optimizer'],
                             options=StateDictOptions(full_state_dict=True))
    for group, kernel in zip(run.optimizer.param_groups, kernels):
        group.update(kernel)
    if run.ema is not None and saved_ema(saved) is not None:
        run.ema.module.load_state_dict(saved_ema(saved))
    schedule_changes = changed_settings(run.cfg, saved, SCHEDULE_SETTINGS)
    if schedule_changes:  # the new schedule, at the step the run has reached
        run.scheduler.step_update(num_updates=saved['step'])
        _logger.warning('resuming on a new learning-rate schedule (%s): lr %.3g at step %d',
                        '; '.join(schedule_changes), run.optimizer.param_groups[-1]['lr'],
                        saved['step'])
    else:
        run.scheduler.load_state_dict(saved['scheduler'])
    run.scaler.load_state_dict(saved['scaler'])
    state.step, state.epoch = saved['step'], saved['epoch']
    state.step_in_epoch = saved['step_in_epoch']
    state.best = saved['meta']['metrics'].get('best_top1', -1.0)
    env = run.env
    if saved['world_size'] == env.world_size:
        ckpt.restore_rng(saved['rng'][env.rank])
    else:  # another world size: data order is kept, per-rank random streams restart
        torch.manual_seed(run.cfg.trainer.seed + state.step * 1009 + env.rank)
    if env.is_main:
        _logger.info('resumed from %s at epoch %d, step %d', resume, state.epoch, state.step)
    return state


def train_step(run: Run, state: RunState, batches: Iterator, window: MetricWindow) -> None:
    """One optimizer step over trainer.accum_steps micro-batches, without a host sync."""
    cfg, env = run.cfg, run.env
    accum = cfg.trainer.accum_steps
    for micro in range(accum):
        batch = next(batches)
        # DDP all-reduces gradients on the last micro-batch only; FSDP2 on every one
        sync = micro == accum - 1 or not env.enabled or cfg.trainer.fsdp
        with (contextlib.nullcontext() if sync else run.trained.no_sync()):
            loss, images, sums = run.method.step(run, state, batch)
            run.scaler.scale(loss / accum).backward()
        window.add(loss, images, sums)
    run.method.before_update(run, state)
    if cfg.optim.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trained.parameters(), cfg.optim.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.step_in_epoch += 1
    run.scheduler.step_update(num_updates=state.step)
    if run.ema is not None:
        run.ema.update(run.model, step=state.step)
    run.method.after_update(run, state)


def log_train(run: Run, state: RunState, window: MetricWindow, bar: tqdm) -> None:
    """Log the window's loss, the method's values and speed; stop on a non-finite loss, or
    when the method says the run has failed (DINO: collapse). HOST SYNC."""
    sums = window.totals()
    check_finite(state, sums)
    seen = max(sums[MetricWindow.IMAGES], 1.)
    values = run.method.record(sums[MetricWindow.METHOD:], seen)
    record = dict(epoch=state.epoch, loss=sums[MetricWindow.LOSS] / seen, **values,
                  lr=run.optimizer.param_groups[-1]['lr'],
                  images_per_s=seen / max(time.perf_counter() - window.tic, 1e-9))
    run.logger.log('train', state.step, **record)
    warn_if_cores_shared(run, window)
    shown = next(iter(values))  # the method's first value: top-1, or DINO's output spread
    bar.set_postfix(epoch=state.epoch, loss=f'{record["loss"]:.3f}',
                    **{shown: f'{values[shown]:.3g}'}, img_s=f'{record["images_per_s"]:.0f}')
    window.reset()
    run.method.check(record, state)


def warn_if_cores_shared(run: Run, window: MetricWindow) -> None:
    """Once per run: training on CPU got less than half the cores its threads could use
    (judged after the first window, which includes warm-up)."""
    window.windows += 1
    run.logger.pace.check(run.total_steps, run.env.device.type)  # crowded cores: warn early
    threads = torch.get_num_threads()
    if run.env.device.type != 'cpu' or window.warned or window.windows == 1 or threads == 1:
        return
    cores = window.cores_used()
    if cores < 0.5 * threads:
        window.warned = True
        _logger.warning('training ran %d threads but got %.1f cores of CPU time: the cores are '
                        'shared with other work (or data loading is the bottleneck: raise '
                        'data.num_workers). With busy cores, trainer.threads=1 is often faster.',
                        threads, cores)


def check_finite(state: RunState, sums: List[float]) -> None:
    if sums[MetricWindow.NONFINITE]:
        raise FloatingPointError(diverged(f'the loss became {sums[MetricWindow.LOSS]}', state))


def diverged(what: str, state: RunState) -> str:
    latest = state.checkpoint  # every save checks first, so it predates the divergence
    return (f'{what} by epoch {state.epoch} step {state.step}; stopped without saving. Latest '
            f'checkpoint, saved before that: {latest or "none yet"}. Set optim.clip_grad or '
            f'trainer.amp=none and resume with trainer.resume={latest or "<checkpoint>"}, or '
            f'start a new run with a lower optim.lr')


def stop_requested(stop: StopRequested, env: DistEnv) -> bool:
    """Did SIGTERM/SIGINT reach any rank? Without a process group a plain flag read; with one,
    a one-value collective every step so that all ranks stop at the same step (HOST SYNC)."""
    if not env.enabled:
        return stop.signal is not None
    return all_sum(torch.tensor([float(stop.signal is not None)], dtype=torch.float64))[0] > 0


def save_checkpoint(run: Run, state: RunState, window: MetricWindow, is_best: bool = False) -> None:
    """Every rank takes part (collectives), rank 0 writes; never after a non-finite loss.
    HOST SYNC."""
    check_finite(state, window.totals())
    average_bn(run)
    model_state = get_model_state_dict(run.trained, options=FULL)
    # a finite loss can still step to non-finite weights; rank 0 holds them all
    bad = [name for name, value in model_state.items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if all_sum(torch.tensor([float(len(bad))], dtype=torch.float64))[0]:
        raise FloatingPointError(diverged(f'weights became non-finite ({", ".join(bad[:3])})',
                                          state))
    optim_state = get_optimizer_state_dict(run.trained, run.optimizer, options=FULL)
    rng = [None] * run.env.world_size
    if run.env.enabled:
        torch.distributed.all_gather_object(rng, ckpt.capture_rng())
    else:
        rng = [ckpt.capture_rng()]
    path = None
    if run.env.is_main:
        cfg = run.cfg
        model_state, method_state = run.method.split_state(model_state)
        saved = dict(
            model=model_state,
            meta=dict(run.meta, epoch=state.epoch, step=state.step, metrics=state.metrics),
            optimizer=optim_state, scheduler=run.scheduler.state_dict(),
            scaler=run.scaler.state_dict(), step=state.step, epoch=state.epoch,
            step_in_epoch=state.step_in_epoch,
            sampler=dict(seed=cfg.trainer.seed, global_batch=cfg.data.batch_size,
                         repeats=cfg.aug.repeated_aug, num_samples=len(run.train_set)),
            rng=rng, world_size=run.env.world_size, config=OmegaConf.to_container(cfg),
            **method_state, **run.method.state())
        if run.ema is not None:
            saved[EMA_KEY] = run.ema.module.state_dict()
        path = run.manager.save(saved, state.step, is_best)
    barrier()
    state.checkpoint = path


def average_bn(run: Run) -> None:
    """Average the BatchNorm statistics of the model, its EMA and the method's other networks
    (DINO's teacher) over ranks."""
    distribute_bn(run.model, run.ema.module if run.ema is not None else None,
                  *run.method.bn_modules())


def evaluate_run(run: Run, state: RunState, window: MetricWindow, epoch: int, bar: tqdm) -> None:
    """Evaluate as the run's method does (supervised: the model and its EMA), keep the best,
    and checkpoint."""
    average_bn(run)  # one set of BatchNorm statistics over ranks, as the checkpoint will hold
    metrics = run.method.evaluate(run, epoch, state.step)
    headline = run.method.headline(metrics)
    is_best = headline > state.best
    state.best = max(state.best, headline)
    state.metrics = dict(metrics, best_top1=state.best)
    line = run.method.summary(metrics, epoch, state.step)
    if run.env.is_main and line:
        bar.write(line)
    elif run.env.is_main:
        bar.write(f'epoch {epoch} step {state.step}: {run.cfg.data.eval_split} top-1 '
                  f'{metrics["top1"]:.2f}%'
                  + (f', EMA {metrics["ema_top1"]:.2f}%' if run.ema is not None else ''))
    save_checkpoint(run, state, window, is_best)
