"""Read a weight file safely and find the weights inside it.

The format is sniffed from the bytes, not the file name: safetensors, a PyTorch zip checkpoint
(torch >= 1.6) or a legacy PyTorch pickle (mmpretrain publishes these). PyTorch files are read
with ``weights_only=True``: tensors, containers and plain values only, never arbitrary code.
The one class allowed beyond torch's own list is ``argparse.Namespace``, which DeiT-style
checkpoints (the paper's training code) store under ``'args'``.

Damage is reported, not loaded: torch's zip reader ignores the CRC-32 checksums torch writes,
so they are checked here (one more read of the file, ~0.1 s per 150 MB from the page cache),
and weights holding NaN or infinity (a damaged file or a diverged run) are refused.

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
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

__all__ = ['Checkpoint', 'CheckpointError', 'read_checkpoint', 'EMA_KEYS', 'MODEL_KEYS']

_logger = logging.getLogger(__name__)

EMA_KEYS = ('model_ema', 'state_dict_ema', 'ema')  # DeiT, timm train.py, conformer-zoo engine
MODEL_KEYS = ('model', 'state_dict')  # DeiT / conformer-zoo engine, mmpretrain / timm

_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')
_PICKLE_PROTO = b'\x80'  # legacy torch.save files open with a protocol-2+ pickle
_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong."""


@dataclass
class Checkpoint:
    """The weights read from one file, and where in the file they came from."""
    state_dict: Dict[str, torch.Tensor]
    path: Path
    file_format: str  # 'safetensors' | 'torch' | 'torch-legacy'
    weights_key: Optional[str] = None  # wrapper entry the weights came from; None: bare state_dict
    meta: Dict[str, Any] = field(default_factory=dict)  # the wrapper's 'meta' entry, if a dict
    architecture: Optional[str] = None  # model name recorded by the training run, if any


def read_checkpoint(path: Union[str, Path], use_ema: bool = True) -> Checkpoint:
    """Read `path` without executing code from it and return its (EMA by default) weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    file_format = sniff_format(path)
    if file_format == 'safetensors':
        try:
            checkpoint = Checkpoint(load_safetensors(path, device='cpu'), path, file_format)
        except SafetensorError as e:
            raise CheckpointError(f'{path}: corrupt safetensors file ({e}); the file is '
                                  f'truncated or damaged, copy or download it again') from e
    else:
        obj = _torch_load(path, file_format)
        state_dict, key = _pick_weights(obj, path, use_ema)
        wrapper = obj if key else {}
        meta = wrapper.get('meta') if isinstance(wrapper.get('meta'), dict) else {}
        args = wrapper.get('args')
        architecture = meta.get('variant') or getattr(args, 'model', None) or wrapper.get('arch')
        checkpoint = Checkpoint(state_dict, path, file_format, key, meta,
                                architecture if isinstance(architecture, str) else None)
    _check_finite(checkpoint)
    return checkpoint


def sniff_format(path: Path) -> str:
    """Tell the file format from its first bytes; explain files that are not weights."""
    size = path.stat().st_size
    with path.open('rb') as f:
        head = f.read(9)
    if size == 0:
        raise CheckpointError(f'{path}: the file is empty')
    if head[:4] in _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f'{path}: truncated PyTorch checkpoint ({size} bytes, the zip directory at its '
                f'end is missing); the download or copy was cut short, fetch it again')
        return 'torch'
    if head[:1] == _PICKLE_PROTO:
        return 'torch-legacy'
    if len(head) == 9 and head[8:9] == b'{':
        header_len = struct.unpack('<Q', head[:8])[0]
        if header_len + 8 > size:
            raise CheckpointError(
                f'{path}: truncated safetensors file ({size} bytes, its header alone claims '
                f'{header_len + 8}); copy or download it again')
        return 'safetensors'
    hint = (' It looks like a web page (an error or login page saved instead of the weights).'
            if head.lstrip()[:1] == b'<' else '')
    raise CheckpointError(f'{path}: not a PyTorch checkpoint or safetensors file (it starts '
                          f'with {head!r}).{hint}')


def _torch_load(path: Path, file_format: str) -> Any:
    if file_format == 'torch':
        _check_zip_crcs(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = _unsafe_globals(path, file_format, e)
            if unsafe:
                raise CheckpointError(
                    f'{path}: besides weights the file pickles {", ".join(unsafe)}, which '
                    f'weights-only loading refuses (it could run code). If you trust the file, '
                    f're-save just its weights: python -c "import torch; '
                    f'c = torch.load(\'{path}\', weights_only=False); '
                    f'torch.save(c.get(\'state_dict\', c.get(\'model\', c)), \'weights.pth\')"'
                ) from e
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
        raise CheckpointError(f'{path}: damaged PyTorch checkpoint ({e}): its bytes changed '
                              f'after it was saved (bit rot or a bad copy); copy or download '
                              f'it again') from e


def _unsafe_globals(path: Path, file_format: str, error: Exception) -> list:
    if file_format == 'torch':
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # the scan fails on a damaged pickle too: the caller says corrupt
            return []
    # legacy pickles cannot be scanned; torch names the first refused global in its message
    return [line.split('GLOBAL', 1)[1].strip() for line in str(error).splitlines()
            if 'Unsupported global' in line and 'GLOBAL' in line][:1]


def _corrupt(path: Path, error: Exception) -> CheckpointError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f'{path}: corrupt or truncated PyTorch checkpoint '
                           f'({path.stat().st_size} bytes; torch says: {reason}); copy or '
                           f'download it again')


def _check_finite(checkpoint: Checkpoint) -> None:
    """NaN or infinity in the weights makes every prediction NaN; refuse it up front."""
    for key, tensor in checkpoint.state_dict.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = torch.aminmax(tensor)  # NaN propagates; cheaper than isfinite(tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f'{checkpoint.path}: {key!r} holds NaN or infinite values ({bad} of '
                f'{tensor.numel()}): the file is damaged or the training run diverged; use '
                f'another checkpoint (an earlier one of the run), or copy or download it again')


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
