"""Evaluate weights (a training checkpoint, any local weights file, or the variant's
pretrained download) on the eval split of a dataset config.

A training checkpoint describes itself: the model, its architecture, input channels,
preprocessing and classes come from its record, unless set on the command line.
"""
from typing import Any, Dict, List

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
from .distributed import init_distributed
from .evaluate import evaluate, resolve_amp


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
    return dict(evaluate(model, loader, env.device, amp), checkpoint=cfg.checkpoint,
                classes=list(classes))


def select_trained_classes(cfg, state: Dict[str, Any], classes: List[str]) -> bool:
    """With data.classes unset, keep the classes the checkpoint was trained on when the data
    has them all (under other indices); True when data.classes was set."""
    trained = state.get('meta', {}).get('classes')
    if cfg.data.classes is not None or not trained or list(trained) == list(classes) \
            or not set(trained) <= set(classes):
        return False
    cfg.data.classes = [classes.index(name) for name in trained]
    return True
