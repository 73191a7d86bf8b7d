"""Evaluate weights (a training checkpoint, any local weights file, or the variant's
pretrained download) on the eval split of a dataset config."""
from typing import Any, Dict

import torch

from conformer.data import build_datasets
from .build import build_model, eval_loader
from .checkpoint import load
from .config import check
from .distributed import init_distributed
from .evaluate import evaluate, resolve_amp


def evaluate_checkpoint(cfg) -> Dict[str, Any]:
    check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = init_distributed(cfg.device)
    amp = resolve_amp(cfg.amp, env.device)
    _, eval_set, classes = build_datasets(cfg.data)
    model = build_model(cfg.model, len(classes), cfg.data.in_chans)
    if cfg.checkpoint:
        state = load(cfg.checkpoint)
        if 'model' not in state:
            raise ValueError(f'{cfg.checkpoint} is not a conformer-train checkpoint (no "model" '
                             f'key); pass it as model.pretrained=true model.checkpoint=<path>')
        weights = state['ema'] if cfg.use_ema and 'ema' in state else state['model']
        model.load_state_dict(weights)
    model.to(env.device)
    loader = eval_loader(eval_set, cfg.data, cfg.aug, env.rank, env.world_size)
    return dict(evaluate(model, loader, env.device, amp), checkpoint=cfg.checkpoint,
                classes=list(classes))
