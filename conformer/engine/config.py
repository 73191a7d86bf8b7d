"""The typed schema of every training/eval config, registered in Hydra's ConfigStore.

`configs/train.yaml` lists `train_schema` first in its defaults, so Hydra merges each
group file and command-line override into these dataclasses: an unknown key or a value of
the wrong type fails at composition, naming the key. `check()` then catches what types
cannot (incompatible settings) before any data is read or model is built.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from conformer.models import check_model_name


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
    checkpoint: Optional[str] = None  # or these local weights (any format, incl. our checkpoints)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    freeze_backbone: bool = False  # linear probe: train only the two heads
    grad_checkpointing: bool = False
    sync_bn: bool = False  # SyncBatchNorm for the CNN branch under DDP (GPU)
    channels_last: bool = False


@dataclass
class DataConfig:
    name: str = 'imagefolder'  # 'imagefolder' | 'fashion_mnist'
    root: Optional[str] = None
    train_split: str = 'train'
    eval_split: str = 'val'
    download: bool = True  # fashion_mnist only: fetch with torchvision when no local copy
    strict: bool = False  # imagefolder: fail on the first unreadable image instead of skipping
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
    num_workers: int = 4


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
    threads: Optional[int] = None  # torch intra-op threads per process (None: torch default)
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


CHOICES = {
    'data.name': ('imagefolder', 'fashion_mnist'),
    'aug.train_crop': ('rrc', 'pad'),
    'trainer.amp': ('auto', 'bf16', 'fp16', 'none'),
    'amp': ('auto', 'bf16', 'fp16', 'none'),  # conformer-eval's
    'trainer.device': ('auto', 'cpu', 'cuda'),
}


def check(cfg) -> None:
    """Reject settings that are well-typed but cannot work together, naming key and fix."""
    def fail(msg: str):
        raise ValueError(f'config error: {msg}')

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=allowed[0])
        if value not in allowed:
            fail(f'{key}={value!r}; choose one of {list(allowed)}')
    try:
        check_model_name(cfg.model.name)
    except ValueError as e:
        fail(f'model.name: {e}')
    if len(cfg.data.mean) != cfg.data.in_chans or len(cfg.data.std) != cfg.data.in_chans:
        fail(f'data.mean/data.std need {cfg.data.in_chans} values (data.in_chans), got '
             f'{len(cfg.data.mean)}/{len(cfg.data.std)}')
    if 'trainer' not in cfg:
        return
    t = cfg.trainer
    for key, value in (('data.batch_size', cfg.data.batch_size), ('trainer.epochs', t.epochs),
                       ('trainer.accum_steps', t.accum_steps), ('aug.repeated_aug', cfg.aug.repeated_aug),
                       ('trainer.keep_last', t.keep_last)):
        if value < 1:
            fail(f'{key} must be >= 1, got {value}')
    if cfg.data.batch_size % t.accum_steps:
        fail(f'data.batch_size={cfg.data.batch_size} (global) is not divisible by '
             f'trainer.accum_steps={t.accum_steps}')
    if cfg.model.freeze_backbone and cfg.optim.layer_decay is not None:
        fail('model.freeze_backbone (linear probe) trains only the heads; '
             'drop optim.layer_decay')
    if t.fsdp and t.ema:
        fail('trainer.fsdp=true with trainer.ema=true is not supported (the EMA copy would '
             'need sharding too); set trainer.ema=false')


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name='train_schema', node=TrainConfig)
    cs.store(name='eval_schema', node=EvalConfig)


register()
