"""Checkpoints that survive a kill at any moment and load with `torch.load(weights_only=True)`.

A checkpoint is written to a temporary file in the run directory, flushed, fsynced and
renamed over its final name, so a reader sees the old file or the new one, never half of
one; a write that fails (a full disk included) removes its temporary file, and temporary files
of writers that were killed are removed when the next run opens the folder. `last.pth` and
`best.pth` are hard links to the newest and the best step files; the step files beyond
`keep_last` are deleted. Content is tensors and plain containers only: RNG states are stored
as tensors, the config as a plain dict.
"""
import contextlib
import errno
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from conformer.weights.reader import CheckpointError, read_file, remove_stale_tmp_files, tensors_in

_logger = logging.getLogger(__name__)

LAST, BEST = 'last.pth', 'best.pth'
# what a run resumes from (trainer.train writes them all)
TRAIN_STATE = ('model', 'optimizer', 'scheduler', 'scaler', 'step', 'epoch', 'step_in_epoch',
               'sampler', 'rng', 'world_size', 'meta')
# out of space, over the file size limit (RLIMIT_FSIZE), over the disk quota
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NoSpaceError(OSError):
    """A checkpoint write that ran out of disk space (or into the file size limit)."""


def atomic_save(obj: Dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` so that `path` holds either its old content or all of the new.

    Args:
        obj: what to save (tensors and plain containers).
        path: the checkpoint file; its folder must exist.
    """
    tmp = _tmp_name(path)
    with _writing(tmp, lambda: _state_bytes(obj)):
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _link(src: Path, dst: Path) -> None:
    """Atomically make `dst` name the same content as `src` (hard link, else a copy)."""
    tmp = _tmp_name(dst)
    with _writing(tmp, lambda: src.stat().st_size):
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.tmp{os.getpid()}')


@contextlib.contextmanager
def _writing(tmp: Path, needed_bytes: Callable[[], int]) -> Iterator[None]:
    """Remove the partial `tmp` file whatever stops the write; a full disk (torch reports it
    as 'unexpected pos') is raised as NoSpaceError naming the folder and the space needed."""
    try:
        yield
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _disk_full_cause(e)
        if cause is not None:
            raise NoSpaceError(
                f'no space left on device in {tmp.parent}: {needed_bytes() / 2 ** 20:.0f} MB '
                f'needed for a checkpoint ({cause.strerror}); free space there or point the '
                f'run at another disk, then resume') from e
        raise


def _disk_full_cause(error: BaseException) -> Optional[OSError]:
    """The out-of-space OSError behind `error` (torch.save wraps it in a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def _state_bytes(obj: Any) -> int:
    """Bytes of tensor data in `obj` (shared storages counted once): a checkpoint's size."""
    storages = {}
    for _, tensor in tensors_in(obj):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class CheckpointManager:
    """Writes `step-<n>.pth`, keeps the newest `keep_last` of them, plus last.pth and best.pth.

    Args:
        directory: the run's checkpoint folder (created if missing). Temporary files left in
            it by killed writers are removed.
        keep_last: how many step files to keep.
    """

    def __init__(self, directory: Path, keep_last: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        stale = remove_stale_tmp_files(self.dir, r'\..+\.tmp(?P<pid>\d+)')  # see _tmp_name
        if stale:
            _logger.info('removed %d temporary checkpoint files of writers that were killed: %s',
                         len(stale), ', '.join(p.name for p in stale))

    def save(self, state: Dict[str, Any], step: int, is_best: bool) -> Path:
        """Write `state` atomically as the step file and last.pth, and drop old step files.

        Args:
            state: the checkpoint dict.
            step: the optimizer step, which names the file.
            is_best: also make it best.pth.

        Returns:
            The step file written.
        """
        path = self.dir / f'step-{step:08d}.pth'
        atomic_save(state, path)
        _link(path, self.dir / LAST)
        if is_best:
            _link(path, self.dir / BEST)
        for old in sorted(self.dir.glob('step-*.pth'))[:-self.keep_last]:
            old.unlink()
        return path

    def latest(self) -> Optional[Path]:
        return latest(self.dir)


def latest(directory: Path) -> Optional[Path]:
    """The newest checkpoint a run wrote into `directory`, if any (what resume=auto takes).

    Args:
        directory: a run's checkpoint folder.
    """
    path = Path(directory) / LAST
    return path if path.is_file() else None


def load(path: str, key: str = 'checkpoint', required: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a checkpoint with the weights loader's checks (`conformer.weights.read_file`:
    CRC-32s, NaN/inf, no pickled code); the errors name the setting and what to pass instead.

    Args:
        path: the .pth file.
        key: the setting that named it (train and eval name theirs).
        required: entries the file must hold.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{key}={path} is a folder; pass a .pth file, e.g. a run's "
                                f'checkpoints/last.pth or checkpoints/best.pth')
    if not path.is_file():
        raise FileNotFoundError(f'{key}={path} does not exist; pass {key}=<path to a .pth '
                                f'written by conformer-train>')
    try:
        state = read_file(path)
    except CheckpointError as e:
        raise RuntimeError(f'cannot read {key}={path}: {e.problem or e}. Or pass another '
                           f'checkpoint, e.g. an older step-*.pth from the same checkpoints/ '
                           f'folder') from e
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f'{key}={path} is not a checkpoint written by conformer-train (it lacks '
                         f'{", ".join(map(repr, missing[:3]))}); for a plain weights file use '
                         f'model.checkpoint={path} instead (it loads weights of any format)')
    return state


def check_data(state: Dict[str, Any], origin: str, num_classes: int, in_chans: int) -> None:
    """A training checkpoint's heads and stem fit the data it was trained on; refuse other
    data here, where a weights loader would quietly start new heads or adapt the stem.

    Args:
        state: the training checkpoint, whose meta records num_classes and in_chans.
        origin: how errors name the checkpoint (the setting that named it).
        num_classes: classes of the configured data.
        in_chans: input channels of the configured data.

    Raises:
        ValueError: the data differs from what the checkpoint was trained on.
    """
    meta = state.get('meta', {})
    for name, value, keys in (('num_classes', num_classes, 'data.root / data.classes'),
                              ('in_chans', in_chans, 'data.in_chans')):
        if name in meta and meta[name] != value:
            raise ValueError(f'{origin} was trained with {name}={meta[name]}, the configured '
                             f'data has {value}: set {keys} as in its training run (to train '
                             f'on this data from its weights, pass the file as model.checkpoint)')


def capture_rng() -> Dict[str, torch.Tensor]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors."""
    version, py_state, gauss = random.getstate()
    kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'python': torch.tensor(py_state, dtype=torch.int64),
        # NaN: no Gaussian held in reserve (the checkpoint reader skips 'rng' in its NaN check)
        'python_gauss': torch.tensor([float('nan') if gauss is None else gauss],
                                     dtype=torch.float64),
        'numpy': torch.from_numpy(np_key.astype(np.int64)),
        'numpy_pos': torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        'numpy_gauss': torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: Dict[str, torch.Tensor]) -> None:
    """Set this process's RNG states back to what `capture_rng` returned.

    Args:
        state: `capture_rng` output; its CUDA states are restored only where CUDA is available.
    """
    torch.set_rng_state(state['torch'])
    gauss = float(state['python_gauss'][0])
    random.setstate((3, tuple(int(v) for v in state['python']), None if gauss != gauss else gauss))
    pos, has_gauss = (int(v) for v in state['numpy_pos'])
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), pos, has_gauss,
                         float(state['numpy_gauss'][0])))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state['cuda']))
