"""Run records (rank 0 only): JSONL history, optional TensorBoard, and a curves PNG.

`metrics.jsonl` gets one line per logging interval (kind 'train') and per evaluation
(kind 'eval'); `curves.png` is redrawn from it after every evaluation, so it covers
resumed runs too.
"""
import json
from pathlib import Path
from typing import Any, Dict, List


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, plot: bool):
        self.run_dir, self.enabled, self.plot = Path(run_dir), enabled, plot
        self.path = self.run_dir / 'metrics.jsonl'
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError('logging.tensorboard=true needs the tensorboard package: '
                                  'pip install tensorboard (or set logging.tensorboard=false)') from e
            self.tb = SummaryWriter(str(self.run_dir / 'tensorboard'))

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = dict(kind=kind, step=step, **values)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f'{kind}/{key}', value, step)
        if kind == 'eval' and self.plot:
            plot_curves(self.history(), self.run_dir / 'curves.png')

    def history(self) -> List[Dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    """Loss and top-1 (train, eval, EMA eval) against optimizer steps."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    train = [r for r in history if r['kind'] == 'train']
    evals = [r for r in history if r['kind'] == 'eval']
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train], label='train')
    ax_loss.plot([r['step'] for r in evals], [r['loss'] for r in evals], 'o-', label='eval')
    ax_loss.set(xlabel='step', ylabel='loss (mean of both heads)', title='loss')
    ax_acc.plot([r['step'] for r in train], [r['top1'] for r in train], label='train (batch)')
    ax_acc.plot([r['step'] for r in evals], [r['top1'] for r in evals], 'o-', label='eval')
    if evals and 'ema_top1' in evals[-1]:
        ax_acc.plot([r['step'] for r in evals], [r['ema_top1'] for r in evals], 's-', label='eval (EMA)')
    ax_acc.set(xlabel='step', ylabel='top-1 %', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name('.' + path.name + '.tmp.png')
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
