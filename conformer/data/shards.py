"""Tar shards in the layout of timm's `wds/` reader and webdataset, read by sample index.

Layout: `<root>/<prefix>-<split>-<shard:06d>.tar`, members `<key>.<jpg|png|webp>` and
`<key>.cls` (the class index as ASCII), and `<root>/_info.json` with
`splits.<split>.{name, num_samples, filenames, shard_lengths}` (plus `classes`, the class names,
when the writer knows them). Shards written by other tools in that layout read the same way.

The reader is map-style: a member-offset index (each sample's shard, byte offset and length,
built once per split by scanning the tar headers, kept like a folder's index) gives random
access, so the global sampler, repeated augmentation and exact resume at any world size work
as they do on a folder. Samples are ordered by key, so shards written from a folder (keys are
the folder's sample positions) give the folder's order, whatever order the shards hold them in.
Each process opens a shard the first time it reads a sample from it.
"""
import io
import json
import logging
import os
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folder import IndexedImages
from .images import READ_ERRORS
from .index import Listing, _string_blob, default_workers, load_or_build, parallel_map

__all__ = ['IMAGE_EXTENSIONS', 'ShardDataset', 'read_info', 'write_shards']

_logger = logging.getLogger(__name__)
INFO_NAMES = ('_info.json', 'info.json')  # as timm's reader looks for them
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')  # member extensions read as the image
_KEPT_AS_IS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}


def read_info(root: Path) -> Tuple[Path, dict]:
    """(path, content) of the shards' `_info.json` under `root`."""
    for name in INFO_NAMES:
        path = root / name
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f'{path} is not readable JSON ({e}); rewrite it with '
                                 f'conformer-shards write') from e
    raise FileNotFoundError(f'{root} has no {INFO_NAMES[0]}: data=shards reads shards in '
                            f"timm's wds layout, whose _info.json lists each split's shards; "
                            f'write them with `conformer-shards write <image folder> {root}`')


# --- reading --------------------------------------------------------------------------------

def _scan_shard(path: str) -> Tuple[Optional[str], List[Tuple[str, str, int, int, int]]]:
    """(error, [(key, image extension, offset, size, label)]) of one shard; label -1 without
    a .cls member. Everything the reader needs, without decoding an image."""
    entries: Dict[str, dict] = {}
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, 'r:') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # as webdataset splits names: the key ends at the first dot of the base name
                dot = member.name.find('.', member.name.rfind('/') + 1)
                if dot < 0:
                    continue
                key, ext = member.name[:dot], member.name[dot + 1:].lower()
                entry = entries.setdefault(key, {})
                if member.offset_data + member.size > size:
                    return (f'truncated: member {member.name} ends at byte '
                            f'{member.offset_data + member.size}, the file has {size}'), []
                if ext in IMAGE_EXTENSIONS and 'image' not in entry:
                    entry['image'] = (ext, member.offset_data, member.size)
                elif ext == 'cls':
                    text = tar.extractfile(member).read().decode('ascii', 'replace').strip()
                    try:
                        entry['label'] = int(text)
                    except ValueError:
                        return f'member {member.name} holds {text[:20]!r}, not a class index', []
    except (OSError, tarfile.TarError, EOFError) as e:
        return f'not a readable tar file ({e}); it may be truncated or corrupt', []
    rows = []
    for key, entry in entries.items():
        if 'image' not in entry:
            return (f'sample {key} has no image member (one of '
                    f'{", ".join("." + e for e in IMAGE_EXTENSIONS)})'), []
        ext, offset, length = entry['image']
        rows.append((key, ext, offset, length, entry.get('label', -1)))
    return None, rows


class ShardDataset(IndexedImages):
    """One split of tar shards, yielding (PIL image, class index or -1) by sample index.

    Args:
        root: the folder holding the shards and `_info.json`.
        split: the split's name in `_info.json` (e.g. 'train', 'validation').
        in_chans: the model's input channels, 3 ('RGB') or 1 ('L').
        strict: refuse the first image that fails to decode instead of a stand-in.
        exact_count: every sample must load (evaluation); without it a sample that fails to
            decode is replaced by another of its class (training).
        workers: processes that scan the shards when the member-offset index is built.

    Raises:
        FileNotFoundError: `_info.json` or a shard it lists is missing.
        ValueError: a shard is truncated or corrupt, holds another number of samples than
            `_info.json` says, repeats a key, or a label lies outside the class list.
    """

    def __init__(self, root: str, split: str, in_chans: int = 3, strict: bool = False,
                 exact_count: bool = False, workers: Optional[int] = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f'shard folder {self.root} does not exist; set data.root')
        self.info_path, info = read_info(self.root)
        splits = info.get('splits', {})
        if split not in splits:
            raise ValueError(f'{self.info_path} has no split {split!r} (it has '
                             f'{sorted(splits)}); set data.train_split / data.eval_split')
        self.split = split
        spec = splits[split]
        self.shards = [self.root / f for f in spec['filenames']]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f'shard {missing[0]} is missing ({len(missing)} of the '
                                    f'{len(self.shards)} shards {self.info_path} lists for '
                                    f'{split!r}); copy it back or rewrite the shards')
        lengths = list(spec.get('shard_lengths') or [])
        if lengths and len(lengths) != len(self.shards):
            raise ValueError(f'{self.info_path}: split {split!r} lists {len(self.shards)} shards '
                             f'but {len(lengths)} shard_lengths')
        self.class_names = info.get('classes')
        listing = load_or_build(
            self.root, f'-{split}', f'shards-{split}',
            lambda: self._scan(lengths, workers or default_workers()),
            self._change)
        super().__init__(listing, in_chans, strict, exact_count, f'{self.root} ({split})')
        self._shard_of = listing.extra['shard']
        self._offset, self._length = listing.extra['offset'], listing.extra['length']
        self._files: Dict[int, object] = {}
        self._pid = os.getpid()

    def _stamp(self) -> Dict[str, np.ndarray]:
        stats = [(st.st_size, st.st_mtime_ns) for st in (os.stat(p) for p in self.shards)]
        names, offsets = _string_blob([str(p) for p in self.shards])
        return dict(shard_stats=np.asarray(stats, np.int64).reshape(-1, 2), shards_blob=names,
                    shards_offsets=offsets,
                    info_mtime=np.array(os.stat(self.info_path).st_mtime_ns))

    def _change(self, listing: Listing) -> Optional[str]:
        now, before = self._stamp(), listing.stamp
        if not np.array_equal(now['shards_blob'], before['shards_blob']) or \
                not np.array_equal(now['shards_offsets'], before['shards_offsets']):
            return f'{self.info_path} now lists other shards'
        changed = np.flatnonzero((now['shard_stats'] != before['shard_stats']).any(axis=1))
        if len(changed):
            return f'shard {self.shards[changed[0]]} was changed'
        if int(now['info_mtime']) != int(before['info_mtime']):
            return f'{self.info_path} was changed'
        return None

    def _scan(self, lengths: Sequence[int], workers: int) -> Listing:
        results = parallel_map(_scan_shard, [str(p) for p in self.shards], min(workers, 8),
                               f'indexing shards of {self.split}')
        keys, rows = [], []
        for number, (path, (error, entries)) in enumerate(zip(self.shards, results)):
            if error:
                raise ValueError(f'shard {path}: {error}; rewrite or replace it')
            if lengths and len(entries) != lengths[number]:
                raise ValueError(f'shard {path} holds {len(entries)} samples, {self.info_path} '
                                 f'says {lengths[number]}: the shard is incomplete or the file '
                                 f'is out of date; rewrite the shards')
            for key, ext, offset, length, label in entries:
                keys.append(key)
                rows.append((number, offset, length, label))
        if not rows:
            raise ValueError(f'the shards of split {self.split!r} under {self.root} hold no '
                             f'samples')
        order = np.argsort(np.asarray(keys, dtype=object), kind='stable')
        table = np.asarray(rows, np.int64)[order]
        keys = [keys[i] for i in order]
        duplicate = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
        if duplicate is not None:
            raise ValueError(f'key {duplicate} appears twice in the shards of {self.split!r} '
                             f'under {self.root}: keys must be unique within a split')
        labels = table[:, 3]
        classes = self._classes(labels, keys, table[:, 0])
        blob, offsets = _string_blob(keys)
        return Listing(str(self.root), f'shards-{self.split}', blob, offsets,
                       labels.astype(np.int32), classes, [], self._stamp(),
                       dict(shard=table[:, 0].astype(np.int32), offset=table[:, 1],
                            length=table[:, 2]))

    def _classes(self, labels: np.ndarray, keys: List[str], shards: np.ndarray) -> List[str]:
        if (labels < 0).all():
            return []
        unlabelled = np.flatnonzero(labels < 0)
        if len(unlabelled):
            i = int(unlabelled[0])
            raise ValueError(f'sample {keys[i]} in shard {self.shards[shards[i]]} has no .cls '
                             f'member while others have one')
        names = self.class_names
        count = len(names) if names else int(labels.max()) + 1
        outside = np.flatnonzero(labels >= count)
        if len(outside):
            i = int(outside[0])
            raise ValueError(f'sample {keys[i]} in shard {self.shards[shards[i]]} has label '
                             f'{int(labels[i])}, outside the {count} classes {self.info_path} '
                             f'names; fix the label or the class list')
        return list(names) if names else [str(c) for c in range(count)]

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: open its own files
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], 'rb', buffering=0)
        return f

    def source(self, index: int) -> io.BytesIO:
        f = self._file(int(self._shard_of[index]))
        length = int(self._length[index])
        data = os.pread(f.fileno(), length, int(self._offset[index]))
        if len(data) != length:
            raise OSError(f'read {len(data)} of {length} bytes: the shard was cut short')
        return io.BytesIO(data)

    def where(self, index: int) -> str:
        return f'{self.shards[int(self._shard_of[index])]}:{self.listing.name(index)}'

    def __getstate__(self) -> dict:  # spawned workers open their own files
        return dict(self.__dict__, _files={})

    def __del__(self):
        for f in getattr(self, '_files', {}).values():
            f.close()


# --- writing --------------------------------------------------------------------------------

def _member(name: str, data: bytes) -> Tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # same bytes on every write
    return info, io.BytesIO(data)


def _encoded(path: Path) -> Tuple[bytes, str]:
    """The file's bytes when the format is one the readers take, else a lossless PNG of it."""
    ext = _KEPT_AS_IS.get(path.suffix.lower())
    if ext:
        return path.read_bytes(), ext
    with Image.open(path) as img:
        img.load()
        out = io.BytesIO()
        img.save(out, 'PNG')
    return out.getvalue(), 'png'


def write_shards(dataset, out: Path, split: str, samples_per_shard: int = 1000,
                 prefix: str = 'shards', seed: int = 0) -> dict:
    """Write an `ImageFolder` (its index's images) as tar shards of one split.

    Samples go into the shards in a seeded shuffle, so that streaming readers (timm's `wds/`)
    see mixed classes; keys are the folder's sample positions, so `ShardDataset` reads them
    back in the folder's order. `_info.json` is updated with this split.

    Args:
        dataset: an `ImageFolder` (labelled or not).
        out: the folder to write into.
        split: the split's name (e.g. 'train', 'val').
        samples_per_shard: samples per tar file (the last may hold fewer).
        prefix: start of the shard file names.
        seed: seed of the shuffle.

    Returns:
        the split's entry in `_info.json`.
    """
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(dataset))
    width = max(8, len(str(len(dataset))))
    filenames, lengths = [], []
    bar = tqdm(total=len(order), desc=f'writing {split}', unit='image',
               disable=not sys.stderr.isatty())
    for number, start in enumerate(range(0, len(order), samples_per_shard)):
        name = f'{prefix}-{split}-{number:06d}.tar'
        chunk = order[start:start + samples_per_shard]
        tmp = out / f'{name}.tmp'
        with tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tar:
            for index in chunk.tolist():
                path = Path(dataset.source(index))
                try:
                    data, ext = _encoded(path)
                except READ_ERRORS as e:
                    raise ValueError(f'cannot read image {path}: {e}; repair or remove it and '
                                     f'write the shards again') from e
                key = f'{index:0{width}d}'
                tar.addfile(*_member(f'{key}.{ext}', data))
                label = int(dataset.targets[index])
                if label >= 0:
                    tar.addfile(*_member(f'{key}.cls', str(label).encode()))
                bar.update()
        os.replace(tmp, out / name)
        filenames.append(name)
        lengths.append(len(chunk))
    bar.close()
    entry = dict(name=split, num_samples=int(len(order)), filenames=filenames,
                 shard_lengths=lengths)
    info_path = out / INFO_NAMES[0]
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.setdefault('name', out.name)
    info.setdefault('splits', {})[split] = entry
    if dataset.classes:
        if info.get('classes', dataset.classes) != list(dataset.classes):
            raise ValueError(f'{info_path} names other classes than {dataset.root}; write '
                             f'the splits of one dataset into one folder')
        info['classes'] = list(dataset.classes)
        info['num_classes'] = len(dataset.classes)
    tmp = info_path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, info_path)
    return entry
