"""Training methods: what a run of the one training loop learns and how it is judged.

`conformer.engine.trainer` owns the loop, checkpoints, logging, resume and distribution; a
method supplies what differs: the network the optimizer trains (the model, or the model with
a projection head), the views of each image, one micro-batch's forward and loss, the sums it
logs, its extra checkpoint state and its evaluation. `method.name` in the config picks one.
"""
from .base import Method
from .dino import DINO
from .supervised import Supervised

METHODS = {'supervised': Supervised, 'dino': DINO}


def build_method(cfg) -> Method:
    """The method `cfg.method.name` names, built from the run's config.

    Args:
        cfg: a `TrainConfig`.
    """
    return METHODS[cfg.method.name](cfg)


__all__ = ['DINO', 'METHODS', 'Method', 'Supervised', 'build_method']
