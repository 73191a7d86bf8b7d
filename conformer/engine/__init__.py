"""Training engine: Hydra config schema, the training loop, checkpointing, evaluation and
distributed setup. `train(cfg, run_dir)` is the whole loop; tools/train.py wraps it."""
from .config import EvalConfig, TrainConfig, check
from .evaluate import dual_head_loss, evaluate
from .trainer import train

__all__ = ['EvalConfig', 'TrainConfig', 'check', 'dual_head_loss', 'evaluate', 'train']
