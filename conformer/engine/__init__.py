"""Training engine: Hydra config schema, the training loop, checkpointing, evaluation and
distributed setup. `train(cfg, run_dir)` is the whole loop; tools/train.py wraps it."""
from .config import EvalConfig, TrainConfig, check
from .evaluate import evaluate
from .trainer import dual_head_loss, train

__all__ = ['EvalConfig', 'TrainConfig', 'check', 'dual_head_loss', 'evaluate', 'train']
