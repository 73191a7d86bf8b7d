"""Get a weight file onto local disk: hash-checked URL downloads, the Hugging Face Hub, folders.

URL downloads land where torch.hub and timm keep theirs (``$TORCH_HOME/hub/checkpoints``,
or ``cache_dir``) under the URL's file name, so a file fetched by either is reused. When the
name carries a sha256 prefix (``...-f6860372.pth``, torch.hub's convention) the bytes are
checked against it, on download and on every cache hit; a failed download never leaves a
file in the cache. ``HF_HUB_OFFLINE=1`` (the switch timm users already set) makes URL weights
cache-only too, and every offline or network failure says where to put the file by hand.
Downloads show a progress bar on stderr (``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it).
"""
import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    are_progress_bars_disabled,
)
from tqdm.auto import tqdm

from .reader import CheckpointError, remove_stale_tmp_files

__all__ = ['DownloadError', 'default_cache_dir', 'fetch_url', 'fetch_hf', 'find_weights_file',
           'sha256_file']

_logger = logging.getLogger(__name__)

# timm's order: safetensors first, then the pickle it replaces
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_DIR_WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pth.tar', '.bin', '.pt')
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Weights that could not be fetched: network, hash mismatch or offline cache miss."""


def default_cache_dir() -> Path:
    """torch.hub's checkpoint cache, shared with timm and torchvision."""
    return Path(torch.hub.get_dir()) / 'checkpoints'


def fetch_url(url: str, cache_dir: Optional[Union[str, Path]] = None,
              progress: Optional[bool] = None) -> Path:
    """Return the cached copy of `url`, downloading it (hash-checked) if it is not cached.

    Args:
        url: an http(s) URL naming a weight file.
        cache_dir: where to keep it; default torch.hub's checkpoint cache.
        progress: show a progress bar on stderr while downloading; default on unless
            ``HF_HUB_DISABLE_PROGRESS_BARS`` is set (the switch Hub downloads obey).
    """
    filename = os.path.basename(urlparse(url).path)
    if not filename:
        raise DownloadError(f'{url}: the URL names no file; point it at the weight file')
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dst = cache / filename
    match = torch.hub.HASH_REGEX.search(filename)
    prefix = match.group(1) if match else None
    if dst.is_file():
        if prefix and not sha256_file(dst).startswith(prefix):
            raise DownloadError(
                f'{dst} (the cached copy of {url}) does not match the sha256 prefix {prefix} '
                f'in its name: it is damaged or another file. Delete it to download it again.')
        return dst
    hint = (f'download {url} on a machine with network access and copy it to {dst}'
            + (f' (its sha256 starts with {prefix})' if prefix else ''))
    if hf_constants.HF_HUB_OFFLINE:
        raise DownloadError(f'{filename} is not in the cache ({cache}) and HF_HUB_OFFLINE is '
                            f'set; unset it, or {hint}')
    cache.mkdir(parents=True, exist_ok=True)
    _logger.info(f'Downloading {url} to {dst}')
    _download(url, dst, prefix, hint,
              not are_progress_bars_disabled() if progress is None else progress)
    return dst


def _download(url: str, dst: Path, prefix: Optional[str], hint: str, progress: bool) -> None:
    """Stream `url` into a temporary file beside `dst`; move it there only once verified."""
    # a download killed outright leaves its file: the next download of the name removes it
    remove_stale_tmp_files(dst.parent, rf'\.{re.escape(dst.name)}\.(?P<pid>\d+)-.*\.partial')
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f'.{dst.name}.{os.getpid()}-',
                               suffix='.partial')
    try:
        digest = hashlib.sha256()
        received = 0
        request = urllib.request.Request(url, headers={'User-Agent': 'conformer-zoo'})
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(request, timeout=60) as response:
            expected = response.headers.get('Content-Length')
            with tqdm(total=int(expected) if expected else None, desc=dst.name, unit='B',
                      unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != int(expected):
            raise DownloadError(f'{url}: the download stopped after {received} of {expected} '
                                f'bytes; try again, or {hint}')
        if prefix and not digest.hexdigest().startswith(prefix):
            raise DownloadError(
                f'{url}: the downloaded file has sha256 {digest.hexdigest()[:16]}..., but its '
                f'name promises {prefix}...: the server sent a damaged or different file. '
                f'Nothing was cached; try again, or {hint}')
        os.replace(tmp, dst)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = (f'HTTP {e.code} {e.reason}' if isinstance(e, urllib.error.HTTPError)
                  else getattr(e, 'reason', None) or e)
        raise DownloadError(f'could not download {url} ({reason}); {hint}') from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with path.open('rb') as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_hf(hf_hub_id: str, filename: Optional[str] = None,
             cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Return a local copy of the weights in Hub repo `org/name[@revision]`.

    Args:
        hf_hub_id: the Hub repo, ``org/name``, optionally with ``@revision``.
        filename: the file to fetch; None means the first of model.safetensors and
            pytorch_model.bin the repo has.
        cache_dir: the Hugging Face cache to use; None means its default.

    Raises:
        DownloadError: the file is neither cached nor reachable, or the repo lacks it.
    """
    repo_id, _, revision = hf_hub_id.partition('@')
    candidates: Sequence[str] = (filename,) if filename else HF_WEIGHT_FILES
    missed_locally = False
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None,
                                        cache_dir=cache_dir, library_name='conformer-zoo'))
        except LocalEntryNotFoundError:  # offline or unreachable, and not cached
            missed_locally = True
        except EntryNotFoundError:  # the repo has no such file
            continue
    if missed_locally:
        raise DownloadError(
            f'hf-hub:{hf_hub_id}: none of {list(candidates)} is in the Hugging Face cache '
            f'({cache_dir or hf_constants.HF_HUB_CACHE}) and the Hub cannot be reached or '
            f'HF_HUB_OFFLINE is set; run once with network access, or on another machine '
            f'`hf download {repo_id} {candidates[0]}` and copy that cache over')
    raise DownloadError(f'hf-hub:{hf_hub_id} has none of {list(candidates)}; pass the file '
                        f'name with pretrained_cfg_overlay=dict(hf_hub_filename=...)')


def find_weights_file(folder: Union[str, Path]) -> Path:
    """The weight file of a model folder: model.safetensors, pytorch_model.bin, or the only one.

    Args:
        folder: the model folder.

    Raises:
        CheckpointError: `folder` is not a folder, or holds no single weight file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'{folder}: not a directory')
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.name.endswith(_DIR_WEIGHT_SUFFIXES))
    if len(found) != 1:
        raise CheckpointError(
            f'{folder}: expected model.safetensors, pytorch_model.bin or a single weight file, '
            f'found {[p.name for p in found] or "none"}; pass the file itself')
    return found[0]
