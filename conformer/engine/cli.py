"""Hydra entry points behind tools/train.py, tools/eval.py and the conformer-train /
conformer-eval console scripts.

The config tree ships inside the package as `conformer.configs`; from a source checkout
that is not installed, the repository's configs/ folder is used.

An error the user can fix (a bad config value, a missing or refused folder, an unreadable
checkpoint) ends with one line on stderr, `<program>: error: <message>`, and exit status 1;
a usage error (an override Hydra cannot parse, a key the schema does not have, a mandatory
value left unset) with status 2. `HYDRA_FULL_ERROR=1` shows the traceback instead.
"""
import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from conformer.weights import DownloadError

from . import config as _schema  # noqa: F401  (registers train_schema / eval_schema)
from .distributed import LaunchError, check_launch, launch_time, launched_rank

_logger = logging.getLogger(__name__)
_new_run_folder: Optional[Path] = None  # the run folder this attempt created, if it did
USAGE_ERRORS = (CompactHydraException, MissingMandatoryValue, InterpolationResolutionError)
# conformer.weights.CheckpointError is a ValueError; OSError covers missing, existing,
# unwritable and full files and folders; DownloadError weights that cannot be fetched
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, DownloadError)


@functools.lru_cache(maxsize=None)
def _launch_datetime() -> datetime:
    return datetime.fromtimestamp(launch_time())


# `${launch_time:%Y-%m-%d_%H-%M-%S}` names run folders: Hydra's `${now:...}` reads each
# process's own clock, so the ranks of one launch could name different folders
OmegaConf.register_new_resolver('launch_time', lambda pattern: _launch_datetime().strftime(
    pattern), use_cache=True, replace=True)


def config_dir() -> str:
    spec = importlib.util.find_spec('conformer.configs')
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    checkout = Path(__file__).resolve().parents[2] / 'configs'
    if (checkout / 'train.yaml').is_file():
        return str(checkout)
    raise FileNotFoundError('cannot find the Hydra configs: reinstall conformer-zoo '
                            '(pip install conformer-zoo) or run from a source checkout')


class _Stop(BaseException):
    """Carries an expected error past Hydra, which would print it under a traceback (or, in a
    callback, turn it into a warning), to `_main`, which reports it."""

    def __init__(self, error: BaseException, status: int):
        super().__init__(error)
        self.error, self.status = error, status


def exit_status(error: BaseException) -> Optional[int]:
    """2 for a usage error, 1 for another expected error (or one raised from it, such as a
    RuntimeError naming an unreadable checkpoint), None for a bug, which keeps its traceback."""
    while error is not None:
        if isinstance(error, USAGE_ERRORS):
            return 2
        if isinstance(error, EXPECTED_ERRORS):
            return 1
        error = error.__cause__
    return None


@contextlib.contextmanager
def _stop_on_expected_errors():
    try:
        yield
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        raise _Stop(e, status) from e


def _full_error() -> bool:
    return os.environ.get('HYDRA_FULL_ERROR') == '1'


def _one_line(error: BaseException) -> str:
    text = str(error).split('Config search path:')[0]  # Hydra's list of config sources
    if 'Original Traceback (most recent call last)' in text:
        # raised in a DataLoader worker, which re-raises it with the worker's traceback in the
        # message: the last line is the error itself, `<type>: <message>`
        text = text.strip().splitlines()[-1].split(': ', 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = error.__cause__
    if isinstance(error, CompactHydraException) and cause is not None and lines:
        # "Could not override 'optim.lrr': Key 'lrr' not in 'OptimConfig'. To append ..."
        lines[0] = f"{lines[0].rstrip('.')}: {str(cause).splitlines()[0].rstrip('.')}."
    return ' '.join(lines)


def _main(config_name: str, task: Callable[[DictConfig], Any], prog: str) -> None:
    full = _full_error()

    @functools.wraps(task)
    def checked(cfg: DictConfig):
        if full:
            return task(cfg)
        with _stop_on_expected_errors():
            return task(cfg)

    try:  # before any work: a wrong launcher variable would fail deep in a later step
        check_launch()
    except LaunchError as e:
        if full:
            raise
        _exit(prog, e, 1)
    previous = os.environ.get('HYDRA_FULL_ERROR')
    os.environ['HYDRA_FULL_ERROR'] = '1'  # Hydra raises composition errors; reported below
    try:
        hydra.main(config_path=config_dir(), config_name=config_name,
                   version_base='1.3')(checked)()
    except _Stop as stop:
        if full:
            raise stop.error
        remove_unused_run_folder()
        _exit(prog, stop.error, stop.status)
    except USAGE_ERRORS as e:
        if full:
            raise
        launch = _cause(e, LaunchError)  # the run folder's name waits for the other ranks
        _exit(prog, launch or e, 1 if launch else 2)
    finally:
        if previous is None:
            os.environ.pop('HYDRA_FULL_ERROR', None)
        else:
            os.environ['HYDRA_FULL_ERROR'] = previous


def _cause(error: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The first error of type `kind` in `error`'s chain of causes and contexts."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def remove_unused_run_folder() -> None:
    """Remove the run folder this attempt created when the run was refused before it wrote
    anything of its own: Hydra's record and log of a run that never started would otherwise
    be left behind, one folder per failed attempt."""
    folder = _new_run_folder
    if folder is None or launched_rank() != 0 or not folder.is_dir():
        return
    if all(p.name == '.hydra' or p.suffix == '.log' for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _exit(prog: str, error: BaseException, status: int) -> None:
    print(f'{prog}: error: {_one_line(error)}', file=sys.stderr)
    sys.exit(status)


def prepare_folder(path: Path, key: str) -> None:
    """Create the run folder `key` names and prove it writable, before Hydra writes its logs
    and records there: a file in the way or a read-only place fails with the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f'{key}={path} is a file; choose a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except (FileExistsError, NotADirectoryError):  # a parent is a file
        blocker = next(p for p in path.parents if p.exists())
        raise NotADirectoryError(f'{key}={path}: {blocker} is a file; choose a folder') from None
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != 30:  # EROFS
            raise
        raise PermissionError(f'cannot write to {path} (read-only): choose a writable '
                              f'{key}') from None


class RunFolderCheck(Callback):
    """Checks the run folder before Hydra writes to it, and keeps an existing run's record.

    Hydra writes `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` into the run folder
    before the task runs. When the folder already holds them (another run, or a run being
    resumed), this attempt writes none: the record of the run that made the folder stays as
    it was, whether this attempt is then refused or resumes it (a checkpoint holds the
    config it was trained with)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _new_run_folder
        run_dir = Path(config.hydra.run.dir)
        _new_run_folder = None if run_dir.exists() else run_dir
        with _stop_on_expected_errors():
            prepare_folder(run_dir, 'hydra.run.dir')
        subdir = config.hydra.output_subdir
        if subdir is not None and (run_dir / subdir / 'config.yaml').exists():
            with read_write(config.hydra):
                config.hydra.output_subdir = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _stop_on_expected_errors():
            prepare_folder(Path(config.hydra.sweep.dir), 'hydra.sweep.dir')


def _train(cfg: DictConfig) -> float:
    from .trainer import train
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(cfg, run_dir)
    if launched_rank() != 0:  # one summary per run, from the rank that wrote it
        return result.get('top1', float('nan'))
    print(run_summary(result, cfg.data.eval_split, run_dir, cfg.logging.plot))
    if 'top1' not in result:
        return float('nan')
    return result['ema_top1'] if 'ema_top1' in result else result['top1']  # what sweepers
    # (e.g. Optuna) optimise


def run_summary(result: dict, split: str, run_dir: Path, plot: bool) -> str:
    """The line a training run ends with: the eval split's top-1 of the last checkpoint and,
    when another checkpoint scored higher, the best one's, each with its file; then the run's
    records (curves.png only when it was drawn).

    Args:
        result: what `train` returned (metrics.json).
        split: data.eval_split, which the figures are measured on.
        run_dir: the run folder.
        plot: logging.plot.
    """
    last = Path(result['checkpoint']) if result.get('checkpoint') not in (None, 'None') else None
    records = [str(run_dir / 'metrics.json')]
    if plot and (run_dir / 'curves.png').is_file():
        records.append(str(run_dir / 'curves.png'))
    if 'top1' not in result:
        return f'run {result["status"]} at step {result["step"]} | checkpoint {last}'
    which = 'EMA' if 'ema_top1' in result else 'model'
    top1 = result['ema_top1'] if which == 'EMA' else result['top1']
    line = (f'{split} top-1 {top1:.2f}% of the last checkpoint {last} ({which}; model '
            f'{result["top1"]:.2f}%, CNN head {result["top1_conv"]:.2f}%, transformer head '
            f'{result["top1_trans"]:.2f}%)')
    best = last.with_name('best.pth') if last is not None else None
    best_top1 = result.get('best_top1')
    if best is not None and best_top1 is not None and best_top1 > top1 and best.is_file():
        line += f' | best {split} top-1 {best_top1:.2f}%: {best}'
    return ' | '.join([line, *records])


def _eval(cfg: DictConfig) -> float:
    from .evaluate import evaluate_checkpoint, plot_confusion
    result = evaluate_checkpoint(cfg)
    if launched_rank() != 0:
        return result['top1']
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    confusion = dict(classes=result['classes'], rows='true class', columns='predicted class',
                     matrix=result.pop('confusion'))
    (run_dir / 'confusion.json').write_text(json.dumps(confusion) + '\n')
    (run_dir / 'eval.json').write_text(json.dumps(result, indent=2) + '\n')
    plot_confusion(confusion['matrix'], confusion['classes'], run_dir / 'confusion.png',
                   f'{result["split"]} split, {result["count"]} images: top-1 '
                   f'{result["top1"]:.2f}%')
    worst = sorted((v, k) for k, v in result['per_class_top1'].items() if v is not None)[:3]
    print(f'{result["split"]} top-1 {result["top1"]:.2f}%, top-5 {result["top5"]:.2f}% (CNN '
          f'head {result["top1_conv"]:.2f}%, transformer head {result["top1_trans"]:.2f}%) on '
          f'{result["count"]} images, {result["device"]} | lowest classes: '
          f'{", ".join(f"{k} {v:.1f}%" for v, k in worst)} | {run_dir / "eval.json"} '
          f'(per-class top-1) | {run_dir / "confusion.png"} | {run_dir / "confusion.json"}')
    return result['top1']


def train_cli() -> None:
    _main('train', _train, 'conformer-train')


def eval_cli() -> None:
    _main('eval', _eval, 'conformer-eval')
