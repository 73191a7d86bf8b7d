"""Read a weight file safely and find the weights inside it.

The format is sniffed from the bytes, not the file name: safetensors, a PyTorch zip checkpoint
(torch >= 1.6) or a legacy PyTorch pickle (mmpretrain publishes these). PyTorch files are read
with ``weights_only=True``: tensors, containers and plain values only, never arbitrary code.
The one class allowed beyond torch's own list is ``argparse.Namespace``, which DeiT-style
checkpoints (the paper's training code) store under ``'args'``.

Damage is reported, not loaded: torch's zip reader ignores the CRC-32 checksums torch writes,
so they are checked here (one more read of the file), and weights or optimizer states holding
NaN or infinity (a damaged file or a diverged run) are refused. `read_file` is the one reader
for every file the project loads (pretrained weights, resume and eval checkpoints).

Layouts found inside a file, and which weights are used:

* a bare state_dict (the paper's released ``.pth`` files, safetensors);
* a wrapper dict: DeiT's ``{'model', 'model_ema', 'optimizer', 'args', ...}``, timm's
  ``{'state_dict', 'state_dict_ema', ...}``, mmpretrain's ``{'meta', 'state_dict'}`` and
  conformer-train's ``{'model', 'ema', 'meta', 'optimizer', 'rng', 'config', ...}`` (its
  ``meta`` records the variant, class names, preprocessing and metrics).
  EMA weights are preferred when present, as timm does (``use_ema=False`` takes the raw ones);
  the log says which key was used.

Key names inside the state_dict (paper, mmpretrain, DDP prefixes) are mapped by the model's
``checkpoint_filter_fn``, not here.
"""
import argparse
import logging
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

__all__ = ['Checkpoint', 'CheckpointError', 'read_checkpoint', 'read_file',
           'remove_stale_tmp_files', 'tensors_in', 'EMA_KEYS', 'MODEL_KEYS']

_logger = logging.getLogger(__name__)

EMA_KEYS = ('model_ema', 'state_dict_ema', 'ema')  # DeiT, timm train.py, conformer-zoo engine
MODEL_KEYS = ('model', 'state_dict')  # DeiT / conformer-zoo engine, mmpretrain / timm

_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')
_PICKLE_PROTO = b'\x80'  # legacy torch.save files open with a protocol-2+ pickle
_CHUNK = 1 << 24
# how torch's refusal names a global: 'Unsupported global: GLOBAL __main__.Foo was ...'
_GLOBAL_IN_MESSAGE = re.compile(r'GLOBAL ([\w.]*\w)')


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong
    (`problem`, when set, is the message without the file's name)."""
    problem: Optional[str] = None


@dataclass
class Checkpoint:
    """The weights read from one file, and where in the file they came from."""
    state_dict: Dict[str, torch.Tensor]
    path: Path
    file_format: str  # 'safetensors' | 'torch' | 'torch-legacy'
    weights_key: Optional[str] = None  # wrapper entry the weights came from; None: bare state_dict
    meta: Dict[str, Any] = field(default_factory=dict)  # the wrapper's 'meta' entry, if a dict
    architecture: Optional[str] = None  # model name recorded by the training run, if any


def read_file(path: Union[str, Path]) -> Any:
    """Everything in the weight or checkpoint file at `path`, read without running code from it
    and checked: zip CRC-32s, and no NaN or infinity in any weights or optimizer state.

    The one reader of the project's files (weights, resume and eval checkpoints), so each file
    gets the same checks and damage the same words.

    Args:
        path: a safetensors file, a PyTorch zip checkpoint or a legacy PyTorch pickle.

    Raises CheckpointError naming the file, the problem and the fix.
    """
    return _read(Path(path))[0]


def read_checkpoint(path: Union[str, Path], use_ema: bool = True) -> Checkpoint:
    """Read `path` as `read_file` does and return its weights.

    Args:
        path: the weight file (see `read_file`).
        use_ema: take the EMA weights when the file holds both (the log says which were used).
    """
    path = Path(path)
    obj, file_format = _read(path)
    if file_format == 'safetensors':
        return Checkpoint(obj, path, file_format)
    state_dict, key = _pick_weights(obj, path, use_ema)
    wrapper = obj if key else {}
    meta = wrapper.get('meta') if isinstance(wrapper.get('meta'), dict) else {}
    args = wrapper.get('args')
    architecture = meta.get('variant') or getattr(args, 'model', None) or wrapper.get('arch')
    return Checkpoint(state_dict, path, file_format, key, meta,
                      architecture if isinstance(architecture, str) else None)


def _read(path: Path) -> Tuple[Any, str]:
    if not path.is_file():
        raise _error(path, 'no such file')
    file_format = sniff_format(path)
    if file_format == 'safetensors':
        try:
            obj = load_safetensors(path, device='cpu')
        except SafetensorError as e:
            raise _error(path, f'corrupt safetensors file ({e}); the file is truncated or '
                               f'damaged, copy or download it again') from e
    else:
        obj = _torch_load(path, file_format)
    _check_finite(obj, path)
    return obj, file_format


def sniff_format(path: Path) -> str:
    """Tell the file format from its first bytes; explain files that are not weights.

    Args:
        path: the file.

    Returns:
        'safetensors', 'torch' (zip) or 'torch-legacy' (plain pickle).

    Raises:
        CheckpointError: the file is empty, truncated or not a weight file.
    """
    size = path.stat().st_size
    with path.open('rb') as f:
        head = f.read(9)
    if size == 0:
        raise _error(path, 'the file is empty')
    if head[:4] in _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise _error(path, f'truncated PyTorch checkpoint ({size} bytes, the zip directory at '
                               f'its end is missing); the download or copy was cut short, fetch '
                               f'it again')
        return 'torch'
    if head[:1] == _PICKLE_PROTO:
        return 'torch-legacy'
    if len(head) == 9 and head[8:9] == b'{':
        header_len = struct.unpack('<Q', head[:8])[0]
        if header_len + 8 > size:
            raise _error(path, f'truncated safetensors file ({size} bytes, its header alone '
                               f'claims {header_len + 8}); copy or download it again')
        return 'safetensors'
    hint = ('; it looks like a web page (an error or login page saved instead of the weights)'
            if head.lstrip()[:1] == b'<' else '')
    raise _error(path, f'not a .pth file (PyTorch checkpoint) or a .safetensors file: it starts '
                       f'with {head!r}{hint}')


def _error(path: Path, problem: str) -> CheckpointError:
    error = CheckpointError(f'{path}: {problem}')
    error.problem = problem
    return error


def _torch_load(path: Path, file_format: str) -> Any:
    if file_format == 'torch':
        _check_zip_crcs(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            code = _pickled_code(path, file_format, e)
            if code:
                raise _error(
                    path, f'the file holds pickled code ({", ".join(code)}) besides weights, so '
                          f'it was not loaded: loading it would run that code. If you trust the '
                          f'file, re-save just its weights: python -c "import torch; '
                          f"c = torch.load('{path}', weights_only=False); "
                          f"torch.save(c.get('state_dict', c.get('model', c)), "
                          f'\'weights.pth\')"') from e
            raise _corrupt(path, e) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise _corrupt(path, e) from e


def _check_zip_crcs(path: Path) -> None:
    """torch's zip reader skips the CRC-32s, so bit rot inside a tensor would load silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC == 0:  # saved with torch.serialization.set_crc32_options(False)
                    continue
                with archive.open(entry) as f:  # raises at the end if the CRC-32 differs
                    while f.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _error(path, f'damaged PyTorch checkpoint ({e}): its bytes changed after it was '
                           f'saved (bit rot or a bad copy); copy or download it again') from e


def _pickled_code(path: Path, file_format: str, error: Exception) -> List[str]:
    """The functions and classes the file's pickle names beyond weights-only loading's list."""
    if file_format == 'torch':
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # the scan fails on a damaged pickle too: the caller says corrupt
            return []
    # legacy pickles cannot be scanned; torch names the first refused global in its message
    return _GLOBAL_IN_MESSAGE.findall(str(error))[:1]


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return _error(path, f'corrupt or truncated PyTorch checkpoint ({path.stat().st_size} bytes; '
                        f'torch says: {reason}); copy or download it again')


def _check_finite(obj: Any, path: Path) -> None:
    """NaN or infinity in the weights makes every prediction NaN, in an optimizer state every
    later step; refuse both up front. RNG states are not checked (they may hold NaN)."""
    if _is_state_dict(obj):
        entries = [(None, obj)]
    elif isinstance(obj, dict):
        entries = [(k, obj[k]) for k in EMA_KEYS + MODEL_KEYS + ('optimizer',) if k in obj]
    else:
        entries = []
    for entry, value in entries:
        for key, tensor in tensors_in(value):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            low, high = torch.aminmax(tensor)  # NaN propagates; cheaper than isfinite(tensor)
            if not (torch.isfinite(low) and torch.isfinite(high)):
                bad = int((~torch.isfinite(tensor)).sum())
                where = f' in its {entry!r} entry' if entry else ''
                raise _error(path, f'{key!r} holds NaN or infinite values ({bad} of '
                                   f'{tensor.numel()}){where}: the file is damaged or the training '
                                   f'run diverged; use another checkpoint (an earlier one of the '
                                   f'run), or copy or download it again')


def tensors_in(obj: Any, prefix: str = '') -> Iterator[Tuple[str, torch.Tensor]]:
    """(dotted key, tensor) for every tensor in nested dicts, lists and tuples.

    Args:
        obj: what a checkpoint file holds.
        prefix: the dotted key of `obj` itself.
    """
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_in(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors_in(value, f'{prefix}.{i}' if prefix else str(i))


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _pick_weights(obj: Any, path: Path,
                  use_ema: bool) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    if _is_state_dict(obj):
        return obj, None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state_dict or a '
                              f'checkpoint dict; save model.state_dict() instead of the model')
    keys = (EMA_KEYS if use_ema else ()) + MODEL_KEYS
    key = next((k for k in keys if _is_state_dict(obj.get(k))), None)
    if key is None:
        raise CheckpointError(f'{path}: found no weights: expected a state_dict, or a dict with '
                              f'one of {list(keys)}; the file has {sorted(map(str, obj))[:12]}')
    others = [k for k in EMA_KEYS + MODEL_KEYS if k != key and _is_state_dict(obj.get(k))]
    if key in EMA_KEYS and others:
        _logger.info(f'{path.name}: using the EMA weights {key!r}; the file also holds '
                     f'{others} (use_ema=False / --no-ema loads {others[0]!r})')
    else:
        _logger.info(f'{path.name}: using the weights under {key!r}')
    return obj[key], key


def remove_stale_tmp_files(directory: Union[str, Path], pattern: str) -> List[Path]:
    """Delete the temporary files that writers killed mid-write (SIGKILL, power loss) left.

    Args:
        directory: the folder they were written in.
        pattern: a regex matching a whole temporary file name, whose group ``pid`` is the
            writer's PID; files of processes still alive are kept.

    Returns the deleted files.
    """
    removed = []
    for tmp in Path(directory).iterdir():
        match = re.fullmatch(pattern, tmp.name)
        if match and not _alive(int(match.group('pid'))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
