"""Run records (rank 0 only): JSONL history, optional TensorBoard, and a curves PNG.

`metrics.jsonl` gets one line per logging interval (kind 'train') and per evaluation
(kind 'eval'); `curves.png` is redrawn from it after every evaluation, so it covers
resumed runs too. A run killed while writing a line leaves half of it at the end: the next
run on the folder drops it, and reading skips it.
"""
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from conformer.runtime import available_cores

_logger = logging.getLogger(__name__)


class RunLogger:
    """Appends a run's records to run_dir/metrics.jsonl (and TensorBoard), on rank 0 only.

    Args:
        run_dir: the run folder.
        enabled: False on the ranks that write nothing.
        tensorboard: also write TensorBoard scalars under run_dir/tensorboard.
        plot: redraw run_dir/curves.png after every evaluation.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, plot: bool):
        self.run_dir, self.enabled, self.plot = Path(run_dir), enabled, plot
        self.path = self.run_dir / 'metrics.jsonl'
        self.tb = None
        self.pace = PaceMonitor(enabled=enabled)
        if not enabled:
            return
        drop_torn_last_line(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # a setting the environment cannot serve: a config error
                raise ValueError('logging.tensorboard=true needs the tensorboard package: pip '
                                 'install tensorboard (or set logging.tensorboard=false)') from e
            self.tb = SummaryWriter(str(self.run_dir / 'tensorboard'))

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Append a record (and numeric values to TensorBoard); an eval record redraws the
        curves when plotting is on.

        Args:
            kind: the record's kind, e.g. 'train' or 'eval'.
            step: the optimizer step.
            **values: the record's values; JSON-serialisable.
        """
        if not self.enabled:
            return
        record = dict(kind=kind, step=step, **values)
        if kind == 'train':
            self.pace.step = step
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f'{kind}/{key}', value, step)
        if kind == 'eval' and self.plot:
            plot_curves(self.history(), self.run_dir / 'curves.png')

    def history(self) -> List[Dict[str, Any]]:
        """The records so far; a line that is not JSON is skipped, with a warning naming it
        unless it is a torn last line."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(errors='replace').splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError as e:
                if line.strip() and number < len(lines):
                    _logger.warning('%s line %d is not a JSON record (%s); left out of the '
                                    'curves: repair or delete that line', self.path, number, e)
        return records

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class PaceMonitor:
    """Warns once, early in a run on CPU, when other work crowds the cores the run trains on:
    the load average far above the cores this process may use. The run then goes several
    times slower than it would alone (OpenMP threads that spin while they wait still count as
    busy, so the process's own CPU time does not show it); the warning gives the time left
    at the current pace and what to do.

    Args:
        enabled: False on the ranks that report nothing.
        load_factor: warn when the 1-minute load average exceeds this many times the cores.
        warm_up_checks: checks to skip first (the first window includes compilation and
            the first batches' loading).
    """

    def __init__(self, enabled: bool = True, load_factor: float = 2.0, warm_up_checks: int = 1):
        self.enabled, self.load_factor, self.warm_up_checks = enabled, load_factor, warm_up_checks
        self.step = 0  # the step of the latest training record
        self.checks, self.warned, self.start = 0, False, None

    def check(self, total_steps: int, device_type: str = 'cpu') -> None:
        """Called after each training record; warns at most once.

        Args:
            total_steps: the steps the run takes in all.
            device_type: where it trains; GPUs are not judged.
        """
        now = time.perf_counter()
        self.checks += 1
        if self.checks <= self.warm_up_checks or self.start is None:
            self.start = (now, self.step)
            return
        if self.warned or not self.enabled or device_type != 'cpu' or \
                not hasattr(os, 'getloadavg'):
            return
        cores = available_cores()
        # the load average counts the whole machine: a run pinned to some of its cores sees
        # its share of it
        load = os.getloadavg()[0] * cores / (os.cpu_count() or cores)
        if load <= self.load_factor * cores:
            return
        self.warned = True
        seconds_per_step = (now - self.start[0]) / max(self.step - self.start[1], 1)
        left = (total_steps - self.step) * seconds_per_step
        fewer_threads = ', or set trainer.threads=1 (often faster on busy cores)' \
            if torch.get_num_threads() > 1 else ''
        _logger.warning(
            'training goes far slower than it could: the load average on the %d core%s it may '
            'use is %.1f, so other work competes for them, and at this pace the run needs about '
            '%s more. Run it when the machine is idle%s; it can be stopped now (Ctrl-C saves a '
            'checkpoint) and resumed later with trainer.resume=auto',
            cores, 's' if cores > 1 else '', load, _duration(left), fewer_threads)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f'{minutes:.0f} min' if minutes < 120 else f'{minutes / 60:.1f} h'


def drop_torn_last_line(path: Path) -> None:
    """Cut an unparsable last line (a kill in the middle of writing it) from a JSON-lines
    file, so that the next record starts a line of its own.

    Args:
        path: the JSON-lines file; a missing file is left alone.
    """
    if not path.is_file():
        return
    data = path.read_bytes()
    end = len(data.rstrip(b'\n'))
    if not end:
        return
    start = data.rfind(b'\n', 0, end) + 1
    try:
        json.loads(data[start:end])
    except ValueError:
        _logger.warning('%s ended in a cut-off line (%r), from a run stopped while writing it: '
                        'dropped', path, data[start:end][:80].decode(errors='replace'))
        os.truncate(path, start)
        return
    if end == len(data):  # a whole record without its newline
        with open(path, 'ab') as f:
            f.write(b'\n')


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    """Loss and top-1 (train, eval, EMA eval) against optimizer steps.

    Args:
        history: the log records (`RunLogger.history`).
        path: the PNG file to write; replaced atomically.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    train = [r for r in history if r['kind'] == 'train']
    evals = [r for r in history if r['kind'] == 'eval']
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    def curve(ax, records, key, *style, **kw):  # the records that have `key`
        points = [(r['step'], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], *style, **kw)

    curve(ax_loss, train, 'loss', label='train')
    curve(ax_loss, evals, 'loss', 'o-', label='eval')
    ax_loss.set(xlabel='step', ylabel='loss', title='loss')
    curve(ax_acc, train, 'top1', label='train (batch)')
    curve(ax_acc, evals, 'top1', 'o-', label='eval')
    if evals and 'knn_top1' in evals[-1]:  # self-supervised runs: k-NN of frozen features
        curve(ax_acc, evals, 'knn_top1', 'o-', label='eval k-NN (teacher)')
    if evals and 'ema_top1' in evals[-1]:
        ax_acc.plot([r['step'] for r in evals], [r['ema_top1'] for r in evals], 's-',
                    label='eval (EMA)')
    ax_acc.set(xlabel='step', ylabel='top-1 %', title='accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name('.' + path.name + '.tmp.png')
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
