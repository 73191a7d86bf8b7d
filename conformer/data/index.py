"""A dataset's listing, made once and kept in one file that every later run and rank loads.

Listing an image tree opens every file's header (to name unreadable files before training), which
costs minutes for ImageNet-sized trees, and on network storage far longer. So the listing is
written to an index: numpy arrays in one uncompressed ``.npz`` (paths as one UTF-8 blob with
offsets, labels as int32), which loads in a fraction of a second for 1.3M entries.

Where: ``<root>/.conformer-index.npz`` when the folder is writable, else under
``$XDG_CACHE_HOME/conformer/index/`` (``~/.cache`` by default).

Staleness is checked cheaply at every load, without listing the tree again: the modification
time of every listed directory (adding, removing or renaming a file changes its folder's), the
entries of the root folder itself, and size and modification time of a sample of the files. A
stale index is rebuilt, with a warning that says what changed. Files edited in place outside the
sample are not noticed: delete the index (or touch their folder) after editing images in place.

Several processes (torchrun, srun) start at once: only the first process of the launch (of the
node, for an index in the local cache) builds; the others wait for its file.
"""
import hashlib
import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from conformer.runtime import available_cores, launch_env

from .images import IMAGE_SUFFIXES, READ_ERRORS, check_image_header

__all__ = ['INDEX_NAME', 'Listing', 'cache_dir', 'load_or_build', 'list_tree']

_logger = logging.getLogger(__name__)
INDEX_NAME = '.conformer-index'  # prefix of every index file; never listed as data
FORMAT = 1  # bump when the arrays change meaning
_SAMPLED_FILES = 64  # files whose size and mtime are checked at every load
_WAIT_LOG_SECONDS = 60


def cache_dir() -> Path:
    """Where indexes of read-only folders go: $XDG_CACHE_HOME/conformer/index."""
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'conformer' / 'index'


def _string_blob(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode('utf-8', 'surrogateescape') for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b''.join(encoded), np.uint8), offsets


def _blob_strings(blob: np.ndarray, offsets: np.ndarray) -> List[str]:
    raw = blob.tobytes()
    return [raw[a:b].decode('utf-8', 'surrogateescape') for a, b in zip(offsets[:-1], offsets[1:])]


@dataclass
class Listing:
    """What an index holds: names relative to `root` (tree paths, or shard members), int32
    labels (-1: no label), class names, and what was found unreadable.

    `extra` carries arrays of other sources (shard byte offsets); `stamp` is what the staleness
    check compares against (see `tree_stamp`)."""
    root: str
    kind: str  # what was listed and how: 'folder', 'folder-unlabelled', 'shards-<split>'
    names_blob: np.ndarray
    names_offsets: np.ndarray
    labels: np.ndarray
    classes: List[str]
    unreadable: List[str]
    stamp: Dict[str, np.ndarray]
    extra: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        a, b = self.names_offsets[index], self.names_offsets[index + 1]
        return self.names_blob[a:b].tobytes().decode('utf-8', 'surrogateescape')

    def names(self) -> List[str]:
        return _blob_strings(self.names_blob, self.names_offsets)

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename), so that a reader never sees half."""
        arrays = dict(format=np.array(FORMAT), names_blob=self.names_blob,
                      names_offsets=self.names_offsets, labels=self.labels)
        for key, strings in (('root', [self.root]), ('kind', [self.kind]),
                             ('classes', self.classes), ('unreadable', self.unreadable)):
            arrays[f'{key}_blob'], arrays[f'{key}_offsets'] = _string_blob(strings)
        arrays.update({f'stamp.{k}': v for k, v in self.stamp.items()})
        arrays.update({f'extra.{k}': v for k, v in self.extra.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Optional['Listing']:
        """The listing in `path`; None when it is absent, unreadable or of another format."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
            return None
        if 'format' not in arrays or int(arrays['format']) != FORMAT:
            return None
        strings = {key: _blob_strings(arrays[f'{key}_blob'], arrays[f'{key}_offsets'])
                   for key in ('root', 'kind', 'classes', 'unreadable')}
        return cls(strings['root'][0], strings['kind'][0], arrays['names_blob'],
                   arrays['names_offsets'], arrays['labels'], strings['classes'],
                   strings['unreadable'],
                   {k[6:]: v for k, v in arrays.items() if k.startswith('stamp.')},
                   {k[6:]: v for k, v in arrays.items() if k.startswith('extra.')})


# --- listing an image tree ------------------------------------------------------------------

def _walk(root: Path) -> Tuple[List[str], List[str]]:
    """(folders, image files) under root, relative and sorted; symlinked folders followed."""
    folders, files = [], []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()
        rel = os.path.relpath(folder, root)
        rel = '' if rel == '.' else rel + '/'
        folders.append(rel)
        files += [rel + n for n in sorted(names)
                  if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
                  and not n.startswith(INDEX_NAME)]
    return folders, files


def _header_error(path: str) -> Optional[str]:
    try:
        check_image_header(path)
        return None
    except READ_ERRORS as e:
        return str(e) or type(e).__name__


def parallel_map(fn: Callable, items: Sequence, workers: int, desc: str) -> List:
    """fn over items in `workers` processes (in order), with a progress bar on a terminal."""
    bar = dict(total=len(items), desc=desc, unit='file', disable=not sys.stderr.isatty(),
               mininterval=1.0, smoothing=0.05)
    if workers <= 1 or len(items) < 256:
        return [fn(item) for item in tqdm(items, **bar)]
    # fork (as DataLoader workers on Linux): the workers only open files, so the parent's
    # threads do not matter, and they start without importing torch again
    with get_context('fork' if sys.platform == 'linux' else 'spawn').Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, items, chunksize=64), **bar))


def default_workers() -> int:
    return max(1, min(available_cores(), 16))


def list_tree(root: Path, labelled: bool, workers: Optional[int] = None) -> Listing:
    """List the images under `root` and open every header in parallel worker processes.

    labelled: `root/<class>/**/<image>`, classes sorted by name; else every image under root
    at any depth, with label -1. Unreadable files are left out and kept, by name, in
    `unreadable`.
    """
    folders, files = _walk(root)
    if labelled:
        classes = sorted(f[:-1] for f in folders if f and f.count('/') == 1)
        if not classes:
            raise FileNotFoundError(f'{root} has no class sub-folders; expected '
                                    f'{root}/<class name>/<image files>, or set '
                                    f'data.labelled=false to list every image without labels')
        label_of = {name: i for i, name in enumerate(classes)}
        files = [f for f in files if '/' in f]  # images directly in root belong to no class
        labels = [label_of[f.split('/', 1)[0]] for f in files]
    else:
        classes, labels = [], [-1] * len(files)
    errors = parallel_map(_header_error, [str(root / f) for f in files],
                          workers or default_workers(), f'indexing {root}')
    keep = [i for i, e in enumerate(errors) if e is None]
    unreadable = [f'{root / files[i]} ({e})' for i, e in enumerate(errors) if e is not None]
    kept = [files[i] for i in keep]
    blob, offsets = _string_blob(kept)
    listing = Listing(str(root), 'folder' if labelled else 'folder-unlabelled', blob, offsets,
                      np.asarray([labels[i] for i in keep], np.int32), classes, unreadable, {})
    listing.stamp = tree_stamp(root, folders, kept)
    return listing


def _entries_digest(root: Path) -> np.ndarray:
    names = sorted(n for n in os.listdir(root) if not n.startswith(INDEX_NAME))
    return np.frombuffer(hashlib.sha1('\0'.join(names).encode('utf-8', 'surrogateescape'))
                         .digest(), np.uint8)


def _file_stats(root: Path, files: Sequence[str]) -> np.ndarray:
    stats = []
    for f in files:
        try:
            st = os.stat(root / f)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return np.asarray(stats, np.int64).reshape(-1, 2)


def _sampled(files: Sequence[str]) -> List[str]:
    if len(files) <= _SAMPLED_FILES:
        return list(files)
    picks = np.linspace(0, len(files) - 1, _SAMPLED_FILES).round().astype(int)
    return [files[i] for i in picks]


def tree_stamp(root: Path, folders: Sequence[str], files: Sequence[str]) -> Dict[str, np.ndarray]:
    """What a tree's staleness check compares: folder mtimes (the root's own entries instead of
    its mtime, since the index file itself lives there), and a sample of file stats."""
    sample = _sampled(files)
    f_blob, f_offsets = _string_blob(folders)
    s_blob, s_offsets = _string_blob(sample)
    mtimes = [os.stat(root / f).st_mtime_ns if f else 0 for f in folders]
    return dict(folders_blob=f_blob, folders_offsets=f_offsets,
                folder_mtimes=np.asarray(mtimes, np.int64), root_entries=_entries_digest(root),
                sample_blob=s_blob, sample_offsets=s_offsets,
                sample_stats=_file_stats(root, sample))


def tree_change(root: Path, stamp: Dict[str, np.ndarray]) -> Optional[str]:
    """What changed in `root` since `stamp` was taken (None: nothing the check sees)."""
    if not np.array_equal(_entries_digest(root), stamp['root_entries']):
        return f'entries of {root} itself were added, removed or renamed'
    folders = _blob_strings(stamp['folders_blob'], stamp['folders_offsets'])
    for folder, mtime in zip(folders, stamp['folder_mtimes'].tolist()):
        if not folder:
            continue
        try:
            now = os.stat(root / folder).st_mtime_ns
        except OSError:
            return f'folder {root / folder} was removed'
        if now != mtime:
            return f'files were added, removed or renamed in {root / folder}'
    sample = _blob_strings(stamp['sample_blob'], stamp['sample_offsets'])
    now = _file_stats(root, sample)
    for name, before, after in zip(sample, stamp['sample_stats'], now):
        if not np.array_equal(before, after):
            return f'file {root / name} was changed or removed'
    return None


# --- finding, checking and building an index, once per launch -------------------------------

def index_paths(source: Path, tag: str) -> Tuple[Path, Path]:
    """(beside the data, in the cache) for the index of `source` tagged `tag`."""
    beside = source / f'{INDEX_NAME}{tag}.npz'
    key = hashlib.sha1(str(source.resolve()).encode('utf-8', 'surrogateescape')).hexdigest()[:16]
    return beside, cache_dir() / f'{source.name}-{key}{tag}.npz'


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def load_or_build(source: Path, tag: str, kind: str, build: Callable[[], Listing],
                  change: Callable[[Listing], Optional[str]],
                  wait_timeout: float = 6 * 3600) -> Listing:
    """The index of `source`: loaded when fresh, else built by one process and awaited by the
    others.

    Args:
        source: the folder the index describes (and lives in when writable).
        tag: distinguishes several indexes of one folder (e.g. shard splits).
        kind: what the index must have been built as (`Listing.kind`).
        build: lists the source (the expensive part).
        change: what changed in the source since a listing was made (None: fresh).
        wait_timeout: seconds a waiting process waits for the builder.
    """
    source = source.resolve()
    beside, cached = index_paths(source, tag)
    path = beside if _writable(source) else cached

    def fresh(candidate: Path) -> Tuple[Optional[Listing], Optional[str]]:
        listing = Listing.load(candidate) if candidate.is_file() else None
        if listing is None:
            return None, None
        if listing.kind != kind:
            return None, f'it was built as {listing.kind}, this run reads {kind}'
        if Path(listing.root) != source:
            return None, f'it lists {listing.root}, not {source} (copied with its data?)'
        return (None, why) if (why := change(listing)) else (listing, None)

    stale = []
    for candidate in dict.fromkeys((path, beside, cached)):
        listing, why = fresh(candidate)
        if listing is not None:
            return listing
        if why:
            stale.append(f'{candidate}: {why}')
    launch = launch_env()  # checked (a bad variable named) before any work by the tools
    builder = (launch.local_rank if path == cached else launch.rank) == 0
    if builder:
        if stale:
            _logger.warning('rebuilding the stale index %s', '; '.join(stale))
        else:
            _logger.info('indexing %s once; later runs load %s', source, path)
        listing = build()
        try:
            listing.save(path)
        except OSError as e:  # read-only after all (e.g. a mount that lies about access)
            if path == cached:
                raise
            _logger.warning('cannot write the index beside the data (%s); writing %s', e, cached)
            listing.save(cached)
        return listing
    start, last_log = time.monotonic(), time.monotonic()
    seen: Dict[Path, Optional[int]] = {}
    while True:
        for candidate in dict.fromkeys((path, cached)):  # the builder may fall back to the cache
            try:
                mtime = candidate.stat().st_mtime_ns
            except OSError:  # not written yet
                mtime = None
            if mtime is not None and mtime != seen.get(candidate):  # a new file: load it
                seen[candidate] = mtime
                listing, _ = fresh(candidate)
                if listing is not None:
                    return listing
        if time.monotonic() - start > wait_timeout:
            raise TimeoutError(f'waited {wait_timeout:.0f} s for the first process to write '
                               f'the index {path} of {source}; did it fail? Build the index '
                               f'once in one process: conformer-shards index {source}')
        if time.monotonic() - last_log > _WAIT_LOG_SECONDS:
            _logger.info('rank %d: waiting for the first process to index %s', launch.rank, source)
            last_log = time.monotonic()
        time.sleep(0.5)
