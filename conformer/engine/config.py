"""The typed schema of every training/eval config, registered in Hydra's ConfigStore.

`configs/train.yaml` lists `train_schema` first in its defaults, so Hydra merges each
group file and command-line override into these dataclasses: an unknown key or a value of
the wrong type fails at composition, naming the key. `check()` then catches what types
cannot (values out of range, incompatible settings) before any data is read or any weights
are allocated.
"""
import difflib
import logging
from dataclasses import dataclass, field
from typing import List, Optional

import timm
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import parse_model_name
from timm.optim import list_optimizers

from conformer.models import check_model_name

from .build import explicit_keys, model_kwargs
from .distributed import launch_env

_logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    name: str = MISSING  # a registered variant, e.g. conformer_tiny_patch16
    # architecture overrides of the variant's defaults (None keeps the variant's value)
    stem_type: Optional[str] = None  # 'imagenet' (stride 4) | 'pooled' (2) | 'small' (1)
    patch_size: Optional[int] = None
    base_channel: Optional[int] = None
    channel_ratio: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    pretrained: bool = False  # load the variant's published weights
    checkpoint: Optional[str] = None  # or these weights: a file (any format), folder, URL, hf-hub:
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    freeze_backbone: bool = False  # linear probe: train only the two heads
    grad_checkpointing: bool = False
    sync_bn: bool = False  # SyncBatchNorm for the CNN branch under DDP (GPU)
    channels_last: bool = False


@dataclass
class DataConfig:
    name: str = 'imagefolder'  # 'imagefolder' | 'shards' | 'fashion_mnist'
    root: Optional[str] = None
    train_split: str = 'train'
    eval_split: str = 'val'
    download: bool = True  # fashion_mnist only: fetch with torchvision when no local copy
    strict: bool = False  # imagefolder, shards: fail on the first unreadable image
    # imagefolder: false lists every image under <root>/<train_split> (or <root>) at any depth,
    # without classes (target -1), for self-supervised pretraining
    labelled: bool = True
    index_workers: Optional[int] = None  # processes that build a listing's index (None: cores)
    in_chans: int = 3
    input_size: int = 224
    interpolation: str = 'bicubic'
    crop_pct: float = 0.875
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    classes: Optional[List[int]] = None  # keep only these class indices (relabelled 0..k-1)
    samples_per_class: Optional[int] = None  # few-label training subsets
    subset_seed: int = 0
    batch_size: int = 128  # global batch over all ranks and accumulation steps
    eval_batch_size: int = 256  # per rank
    num_workers: int = 4  # loader processes, at most the cores the process may use


@dataclass
class AugConfig:
    train_crop: str = 'rrc'  # 'rrc' (random resized crop) | 'pad' (pad + random crop, small images)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    pad: int = 4
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    re_prob: float = 0.0  # random erasing
    re_mode: str = 'pixel'
    re_count: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    repeated_aug: int = 1  # >1: repeated augmentation, each image this many times per epoch


@dataclass
class OptimConfig:
    name: str = 'adamw'  # any timm.optim name
    lr: float = 1e-3
    lr_base_batch: Optional[int] = None  # set: lr scales linearly, lr * batch_size / lr_base_batch
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning), e.g. 0.75
    clip_grad: Optional[float] = None  # max global gradient norm


@dataclass
class SchedConfig:
    name: str = 'cosine'  # any timm.scheduler name
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class MethodConfig:
    """What a run learns (configs/method/): 'supervised' (labels, both heads) or 'dino'
    (self-distillation without labels, Caron et al. 2021); the other keys are DINO's."""
    name: str = 'supervised'  # 'supervised' | 'dino'
    embedding: str = 'both'  # what the projection head sees: 'cnn' (pooled) | 'cls' | 'both'
    out_dim: int = 65536  # prototypes: the projection head's output width
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # weight-normed last layer with its norm fixed at 1
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after warmup_teacher_temp_epochs
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    centering: bool = True  # off only to show collapse
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # rises to 1 on a cosine over the run
    weight_decay_end: float = 0.4  # weight decay rises from optim.weight_decay on a cosine
    freeze_last_layer: int = 1  # epochs the head's last layer does not learn
    global_size: int = 224
    global_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops: int = 8
    local_size: int = 96
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    knn_k: int = 20
    knn_temperature: float = 0.07
    collapse_std: float = 0.1  # collapsed when the outputs' spread falls below this
    collapse_after: int = 0  # steps before the collapse check starts


@dataclass
class TrainerConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke tests)
    accum_steps: int = 1
    amp: str = 'auto'  # 'auto' (bf16 where native) | 'bf16' | 'fp16' (GPU, grad scaler) | 'none'
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    seed: int = 0
    deterministic: bool = False
    threads: Optional[int] = None  # torch intra-op threads (None: the cores this process may use)
    eval_every: int = 1  # epochs
    ckpt_every_steps: Optional[int] = None  # also checkpoint mid-epoch (preemptible machines)
    keep_last: int = 2
    resume: Optional[str] = None  # checkpoint path, or 'auto' for the run dir's last.pth
    fsdp: bool = False  # FSDP2 fully_shard per coupled block (NCCL on GPU, gloo on CPU)
    device: str = 'auto'  # 'auto' | 'cpu' | 'cuda'


@dataclass
class LoggingConfig:
    progress: bool = True
    every_steps: int = 50
    tensorboard: bool = False
    plot: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = 'train'


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    checkpoint: Optional[str] = None  # weights to evaluate (else model.pretrained)
    use_ema: bool = True  # evaluate the checkpoint's EMA weights when it has them
    amp: str = 'auto'
    device: str = 'auto'
    threads: Optional[int] = None


@dataclass
class KnnConfig:
    """conformer-knn: k-NN top-1 of frozen features; the training split is the bank."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    checkpoint: Optional[str] = None  # a .pth written by conformer-train (its record sets model.*)
    # 'auto': the teacher (DINO) or EMA weights when saved, else the model's; 'model'; 'random'
    # (the checkpoint's architecture, freshly initialised); 'pixels' (no network)
    weights: str = 'auto'
    embedding: Optional[str] = None  # 'cnn' | 'cls' | 'both'; None: the DINO head's, else both
    k: int = 20
    temperature: float = 0.07
    seed: int = 0  # of the random initialisation
    amp: str = 'auto'
    device: str = 'auto'
    threads: Optional[int] = None


_OPTIMIZERS = tuple(list_optimizers())
CHOICES = {
    'data.name': ('imagefolder', 'shards', 'fashion_mnist'),
    'data.interpolation': ('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos'),
    'aug.train_crop': ('rrc', 'pad'),
    'optim.name': _OPTIMIZERS + tuple(f'lookahead_{name}' for name in _OPTIMIZERS),
    # what timm.scheduler.create_scheduler_v2 builds for a per-step schedule ('plateau' steps
    # per epoch, 'none' builds nothing; wsd, rsqrt and constant need a recent timm)
    'sched.name': ('cosine', 'tanh', 'step', 'multistep', 'poly', 'constant', 'wsd', 'rsqrt'),
    'trainer.amp': ('auto', 'bf16', 'fp16', 'none'),
    'amp': ('auto', 'bf16', 'fp16', 'none'),  # conformer-eval's
    'trainer.device': ('auto', 'cpu', 'cuda'),
    'method.name': ('supervised', 'dino'),
    'method.embedding': ('both', 'cnn', 'cls'),
    'weights': ('auto', 'model', 'random', 'pixels'),  # conformer-knn's
}
# The range of every number, as an interval; optional settings left unset (null) are skipped.
BOUNDS = {
    'data.in_chans': '[1, inf)',
    'data.input_size': '[1, inf)',
    'data.crop_pct': '(0, 1]',
    'data.samples_per_class': '[1, inf)',
    'data.batch_size': '[1, inf)',
    'data.eval_batch_size': '[1, inf)',
    'data.num_workers': '[0, inf)',
    'data.index_workers': '[1, inf)',
    'aug.pad': '[0, inf)',
    'aug.hflip': '[0, 1]',
    'aug.color_jitter': '[0, inf)',
    'aug.re_prob': '[0, 1]',
    'aug.re_count': '[1, inf)',
    'aug.mixup': '[0, inf)',
    'aug.cutmix': '[0, inf)',
    'aug.mixup_prob': '[0, 1]',
    'aug.mixup_switch_prob': '[0, 1]',
    'aug.label_smoothing': '[0, 1)',
    'aug.repeated_aug': '[1, inf)',
    'optim.lr': '(0, inf)',
    'optim.lr_base_batch': '[1, inf)',
    'optim.weight_decay': '[0, inf)',
    'optim.momentum': '[0, 1)',
    'optim.layer_decay': '(0, 1]',
    'optim.clip_grad': '(0, inf)',
    'sched.warmup_epochs': '[0, inf)',
    'sched.warmup_lr': '[0, inf)',
    'sched.min_lr': '[0, inf)',
    'trainer.epochs': '[1, inf)',
    'trainer.max_steps': '[1, inf)',
    'trainer.accum_steps': '[1, inf)',
    'trainer.ema_decay': '[0, 1)',
    'trainer.threads': '[1, inf)',
    'threads': '[1, inf)',  # conformer-eval's
    'trainer.eval_every': '[1, inf)',
    'trainer.ckpt_every_steps': '[1, inf)',
    'trainer.keep_last': '[1, inf)',
    'logging.every_steps': '[1, inf)',
    'method.out_dim': '[1, inf)',
    'method.hidden_dim': '[1, inf)',
    'method.bottleneck_dim': '[1, inf)',
    'method.student_temp': '(0, inf)',
    'method.teacher_temp': '(0, inf)',
    'method.warmup_teacher_temp': '(0, inf)',
    'method.warmup_teacher_temp_epochs': '[0, inf)',
    'method.center_momentum': '[0, 1)',
    'method.momentum_teacher': '[0, 1]',
    'method.weight_decay_end': '[0, inf)',
    'method.freeze_last_layer': '[0, inf)',
    'method.global_size': '[1, inf)',
    'method.local_crops': '[0, inf)',
    'method.local_size': '[1, inf)',
    'method.knn_k': '[1, inf)',
    'method.knn_temperature': '(0, inf)',
    'method.collapse_std': '[0, 1)',
    'method.collapse_after': '[0, inf)',
    'k': '[1, inf)',  # conformer-knn's
    'temperature': '(0, inf)',
}
# timm's auto-augment policies, by the name before the first '-' (rand-m9-mstd0.5-inc1)
AUTO_AUGMENT = {'rrc': ('rand', 'augmix', 'original', 'originalr', 'v0', 'v0r', '3a'),
                'pad': ('rand',)}  # the pad-crop pipeline applies RandAugment only


def in_interval(value: float, interval: str) -> bool:
    low, high = (float(v) for v in interval[1:-1].split(','))
    return ((low <= value) if interval[0] == '[' else (low < value)) and (
        (value <= high) if interval[-1] == ']' else (value < high))


def describe_interval(interval: str) -> str:
    """'[1, inf)' -> '>= 1'; bounded intervals stay as they are."""
    low, high = interval[1:-1].split(', ')
    if high == 'inf':
        return f"{'>=' if interval[0] == '[' else '>'} {low}"
    return f'in {interval}'


def check(cfg, world_size: Optional[int] = None) -> None:
    """Reject settings that would fail, or silently do something else, once work has started:
    each error names the key, what it takes and the fix.

    Args:
        cfg: a composed train or eval config.
        world_size: the number of processes training runs on; by default this launch's
            (torchrun or srun), which splits data.batch_size into per-rank micro-batches.
    """
    def fail(msg: str):
        raise ValueError(f'config error: {msg}')

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=allowed[0])
        if value not in allowed:
            if len(allowed) <= 10:
                fail(f'{key}={value!r}; choose one of {list(allowed)}')
            fail(f'{key}={value!r} is not one of its {len(allowed)} choices; closest: '
                 f'{difflib.get_close_matches(str(value), allowed, n=5, cutoff=0.4)}')
    for key, interval in BOUNDS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not in_interval(value, interval):
            fail(f'{key} must be {describe_interval(interval)}, got {value}')
    try:
        check_model_name(cfg.model.name)
    except ValueError as e:
        fail(f'model.name: {e}')
    data, aug = cfg.data, cfg.aug
    fit_normalisation(cfg)
    if len(data.mean) != data.in_chans or len(data.std) != data.in_chans:
        fail(f'data.mean/data.std need {data.in_chans} values (data.in_chans), got '
             f'{len(data.mean)}/{len(data.std)}: give one value per channel, or leave them '
             f'unset for the ImageNet statistics averaged over the channels')
    if min(data.std) <= 0:
        fail(f'data.std={list(data.std)}: images are divided by it, every value must be > 0')
    classes = data.classes
    if classes is not None and (not classes or len(set(classes)) < len(classes)):
        fail(f'data.classes={list(classes)}: list each class index once, or leave it '
             f'unset (null) to keep every class')
    if not data.labelled and (classes is not None or data.samples_per_class is not None):
        fail('data.labelled=false trains without labels; data.classes and '
             'data.samples_per_class pick images by label: leave them unset (null)')
    if len(aug.scale) != 2 or not 0 < aug.scale[0] <= aug.scale[1] <= 1:
        fail(f'aug.scale={list(aug.scale)} must be [min, max] image-area fractions with '
             f'0 < min <= max <= 1, e.g. [0.08, 1.0]')
    if aug.auto_augment and aug.auto_augment.split('-')[0] not in AUTO_AUGMENT[aug.train_crop]:
        fail(f'aug.auto_augment={aug.auto_augment!r} with aug.train_crop={aug.train_crop}: start '
             f'it with one of {list(AUTO_AUGMENT[aug.train_crop])} (e.g. rand-m9-mstd0.5-inc1), '
             f'or set it to null')
    check_architecture(cfg, fail)
    if 'checkpoint' in cfg and not (cfg.checkpoint or cfg.model.pretrained or cfg.model.checkpoint):
        fail('no weights to evaluate (they would be random): pass checkpoint=<a .pth written by '
             'conformer-train>, or model.pretrained=true for the published weights of model.name '
             '(model.checkpoint=<file> for weights from elsewhere)')
    if 'trainer' not in cfg:
        return
    t = cfg.trainer
    world = launch_env().world_size if world_size is None else world_size
    parts = world * t.accum_steps
    if data.batch_size % parts:
        fail(f'data.batch_size={data.batch_size} (global) is not divisible by world size '
             f'{world} x trainer.accum_steps={t.accum_steps}; make it a multiple of {parts}')
    micro_batch = data.batch_size // parts
    if (aug.mixup > 0 or aug.cutmix > 0) and micro_batch % 2:
        fail(f'aug.mixup/aug.cutmix pair each image with another of its micro-batch, which '
             f'needs an even number of images, but data.batch_size={data.batch_size} over world '
             f'size {world} x trainer.accum_steps={t.accum_steps} gives {micro_batch}; make '
             f'data.batch_size a multiple of {2 * parts}')
    if cfg.model.freeze_backbone and cfg.optim.layer_decay is not None:
        fail('model.freeze_backbone (linear probe) trains only the heads; '
             'drop optim.layer_decay')
    if OmegaConf.select(cfg, 'method.name') == 'dino':
        check_dino(cfg, fail)
    if t.fsdp and t.ema:
        fail('trainer.fsdp=true with trainer.ema=true is not supported (the EMA copy would '
             'need sharding too): keep trainer.fsdp=false (DDP, as the ImageNet recipes do) to '
             'train with EMA, or set trainer.ema=false to shard the model with FSDP')


def fit_normalisation(cfg) -> None:
    """data.mean/data.std left at the RGB ImageNet statistics (not set on the command line)
    for data.in_chans other than 3: their average, once per channel (grey: 0.449 / 0.226), as
    timm does for pretrained weights of another channel count."""
    data = cfg.data
    explicit = explicit_keys(cfg) or set()
    for key, default in (('mean', IMAGENET_DEFAULT_MEAN), ('std', IMAGENET_DEFAULT_STD)):
        values = list(data[key])
        if len(values) != data.in_chans and f'data.{key}' not in explicit and \
                len(values) == len(default) and all(abs(a - b) < 1e-6
                                                    for a, b in zip(values, default)):
            fitted = [round(sum(default) / len(default), 4)] * data.in_chans
            _logger.info('data.%s=%s: the ImageNet values averaged for data.in_chans=%d',
                         key, fitted, data.in_chans)
            data[key] = fitted


def check_dino(cfg, fail) -> None:
    """Settings DINO cannot honour."""
    m = cfg.method
    for key in ('global_scale', 'local_scale'):
        scale = m[key]
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            fail(f'method.{key}={list(scale)} must be [min, max] image-area fractions with '
                 f'0 < min <= max <= 1, e.g. [0.4, 1.0]')
    if cfg.trainer.ema:
        fail('method=dino keeps its own momentum teacher (method.momentum_teacher); set '
             'trainer.ema=false')
    if cfg.trainer.fsdp:
        fail('method=dino is not supported with trainer.fsdp=true (the teacher would need the '
             'same sharding); use DDP (trainer.fsdp=false)')
    if cfg.model.freeze_backbone:
        fail('method=dino trains the backbone; set model.freeze_backbone=false')
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        fail('method=dino has no labels to mix; set aug.mixup=0 and aug.cutmix=0')


def check_architecture(cfg, fail) -> None:
    """Build the model on the meta device (no memory, ~0.1 s), so that bad model.* settings
    and images smaller than a patch fail now rather than at the first training step."""
    if parse_model_name(cfg.model.name)[0] is not None:  # hf-hub: / local-dir: read files
        return
    try:
        with torch.device('meta'):
            model = timm.create_model(cfg.model.name, in_chans=cfg.data.in_chans,
                                      drop_rate=cfg.model.drop_rate,
                                      drop_path_rate=cfg.model.drop_path_rate,
                                      **model_kwargs(cfg.model))
    except ValueError as e:
        fail(f'model.* settings: {e}')
    if OmegaConf.select(cfg, 'method.name') == 'dino':
        smallest = min(cfg.method.global_size,
                       cfg.method.local_size if cfg.method.local_crops else cfg.method.global_size)
        if smallest < model.patch_size:
            fail(f'method crops of {smallest} px are smaller than the patch size '
                 f'{model.patch_size} of {cfg.model.name}; raise method.local_size / '
                 f'method.global_size or lower model.patch_size')
    if cfg.data.input_size < model.patch_size:
        fail(f'data.input_size={cfg.data.input_size} is smaller than the patch size '
             f'{model.patch_size} of {cfg.model.name}; raise data.input_size or lower '
             f'model.patch_size')


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name='train_schema', node=TrainConfig)
    cs.store(name='eval_schema', node=EvalConfig)
    cs.store(name='knn_schema', node=KnnConfig)


register()
