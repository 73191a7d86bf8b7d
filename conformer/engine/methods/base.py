"""The interface between the training loop and a training method."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class Method:
    """What one training method adds to the loop; `Supervised` and `DINO` implement it.

    The loop calls, in order: `num_classes` and `attach` while building the run (before the
    network is moved and wrapped for distribution), `to` once on the device, `transform` for
    the training loader, then per micro-batch `step` and per optimizer step `before_update`
    and `after_update`; `record` and `check` at each log window; `split_state` and `state`
    when it checkpoints; `evaluate` at each evaluation.

    Args:
        cfg: the run's `TrainConfig`.
    """
    name = ''
    sums: Tuple[str, ...] = ()  # names of the per-image sums `step` returns for the log window

    def __init__(self, cfg):
        self.cfg = cfg

    def num_classes(self, classes: Sequence[str]) -> int:
        """Classes the backbone's own heads get."""
        return len(classes)

    def attach(self, model: nn.Module, saved: Optional[Dict[str, Any]], origin: str) -> nn.Module:
        """The network the optimizer trains, built around `model` (with its weights loaded);
        `saved` is the checkpoint being resumed (None for a new run), named by `origin`."""
        return model

    def to(self, device: torch.device) -> None:
        """Move what the method holds beside the trained network (teacher, centre)."""

    def bn_modules(self) -> List[nn.Module]:
        """Modules besides the model and its EMA whose BatchNorm statistics the loop averages
        over ranks before evaluation and checkpoints."""
        return []

    def transform(self) -> Optional[Callable]:
        """The training transform (None: the supervised one the `aug` group describes)."""
        return None

    def step(self, run, state, batch) -> Tuple[torch.Tensor, int, torch.Tensor]:
        """Forward one micro-batch of the loader at `state` (the run's epoch and step):
        (loss, images, the window sums named by `sums`)."""
        raise NotImplementedError

    def before_update(self, run, state) -> None:
        """After the gradients, before the optimizer steps (e.g. schedules, frozen layers)."""

    def after_update(self, run, state) -> None:
        """After the optimizer stepped (e.g. the teacher's momentum update)."""

    def record(self, sums: Sequence[float], images: float) -> Dict[str, float]:
        """The logged values of a window's sums over `images` images."""
        return {name: value / images for name, value in zip(self.sums, sums)}

    def check(self, record: Dict[str, float], state) -> None:
        """Stop the run with a clear message when the logged window shows it has failed."""

    def split_state(self, full: Dict[str, torch.Tensor]
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The trained network's state dict as (the model's weights, other checkpoint entries)."""
        return full, {}

    def state(self) -> Dict[str, Any]:
        """Checkpoint entries beside the trained network (teacher, centre)."""
        return {}

    def evaluate(self, run, epoch: int, step: int) -> Dict[str, float]:
        """Evaluation metrics, logged by the method."""
        raise NotImplementedError

    def headline(self, metrics: Dict[str, float]) -> float:
        """The metric that picks best.pth."""
        raise NotImplementedError

    def summary(self, metrics: Dict[str, float], epoch: int, step: int) -> Optional[str]:
        """The line an evaluation prints (None: the loop's own top-1 line)."""
        return None
