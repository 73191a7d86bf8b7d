"""Evaluate weights (a training checkpoint, any local weights file, or the variant's
pretrained download) on the eval split of a dataset config."""
from typing import Any, Dict

import torch

from conformer.data import build_datasets
from conformer.weights import load_state_dict_checked
from .build import build_model, check_classes, eval_loader, saved_ema, set_threads
from .checkpoint import check_data, load
from .config import check
from .distributed import init_distributed
from .evaluate import evaluate, resolve_amp


def evaluate_checkpoint(cfg) -> Dict[str, Any]:
    check(cfg)
    set_threads(cfg.threads)
    env = init_distributed(cfg.device)
    amp = resolve_amp(cfg.amp, env.device)
    state = load(cfg.checkpoint, 'checkpoint', required=('model',)) if cfg.checkpoint else None
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
    return dict(evaluate(model, loader, env.device, amp), checkpoint=cfg.checkpoint,
                classes=list(classes))
