#!/usr/bin/env python
"""Benchmark the training input: the listing at start-up, and the training transform's images/s.

``listing``: a tree of small JPEGs (50,000 by default) listed several ways, medians of three
interleaved rounds: the project's former serial scan (every header opened in one process, as
ImageFolder did before it had an index), building the index in one and in `--workers`
processes, and torchvision's ImageFolder (which opens no file). Then loading the index, the
start-up cost a run pays (building its datasets, index present) for that tree and for one of
1,000 images, and the load time of a synthetic index of 1,281,167 entries (ImageNet-1k
train's count, 1,000 class folders).

``pipeline``: generated ImageNet-like JPEGs (500x375 up to 800x600, quality 90) through the DeiT
training transform (random resized crop 224 bicubic, flip, colour jitter 0.3,
rand-m9-mstd0.5-inc1, random erasing 0.25) in one process and one thread, so images/s is per
core: timm's own dataset (its folder reader) with timm's transform, against the project's
ImageFolder and shards through `SeededTransform`. The three alternate round by round in one
process; medians of the rounds are reported, with each one's ratio to timm.

    python tools/bench_input.py listing --out listing.json
    python tools/bench_input.py pipeline --out pipeline.json
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- listing --------------------------------------------------------------------------------

def small_tree(root: Path, images: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(16)]
    for i in range(images):
        folder = root / f'n{i % classes:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        tiles[i % 16].save(folder / f'img_{i:07d}.JPEG', quality=90)
    return root


def serial_scan(root: Path) -> int:
    """What ImageFolder did before the index: list the tree, open every header in turn."""
    from conformer.data.images import IMAGE_SUFFIXES, READ_ERRORS, check_image_header
    count = 0
    for name in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for p in sorted(str(p) for p in (root / name).rglob('*')
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            try:
                check_image_header(p)
                count += 1
            except READ_ERRORS:
                pass
    return count


def synthetic_index(root: Path, entries: int = 1_281_167, classes: int = 1000) -> None:
    """An index of `entries` ImageNet-style names in `classes` real (empty) folders; only the
    files the staleness check samples exist."""
    from conformer.data import index
    folders = [''] + [f'n{c:08d}/' for c in range(classes)]
    for f in folders[1:]:
        (root / f).mkdir(parents=True, exist_ok=True)
    labels = np.arange(entries) * classes // entries
    names = [f'n{c:08d}/n{c:08d}_{i}.JPEG' for i, c in enumerate(labels.tolist())]
    sample = index._sampled(names)
    for name in sample:
        (root / name).write_bytes(b'')
    blob, offsets = index._string_blob(names)
    listing = index.Listing(str(root.resolve()), 'folder', blob, offsets,
                            labels.astype(np.int32), [f[:-1] for f in folders[1:]], [], {})
    listing.stamp = index.tree_stamp(root.resolve(), folders, names)
    listing.save(index.index_paths(root.resolve(), '')[0])


def bench_listing(args) -> dict:
    import torchvision

    from conformer.data import ImageFolder, build_datasets, index
    from conformer.engine.config import DataConfig
    work = Path(tempfile.mkdtemp(prefix='bench-listing-'))
    try:
        result = dict(images=args.images, workers=args.workers,
                      index_entries=args.index_entries)
        big = small_tree(work / 'big' / 'train', args.images, 100)
        small_tree(work / 'big' / 'val', 100, 100)
        small_tree(work / 'small' / 'train', min(1000, args.images), 100)
        small_tree(work / 'small' / 'val', 100, 100)
        serial_scan(big)  # the page cache warm, as for every figure below
        ways = {'serial_scan_s': lambda: serial_scan(big),
                'torchvision_s': lambda: torchvision.datasets.ImageFolder(str(big)),
                'index_build_1_worker_s': lambda: index.list_tree(big.resolve(), True, 1),
                'index_build_s': lambda: index.list_tree(big.resolve(), True, args.workers)}
        times = {name: [] for name in ways}
        for _ in range(3):  # interleaved: a busy spell slows every way alike
            for name, fn in ways.items():
                times[name].append(timed(fn)[0])
        result.update({name: statistics.median(t) for name, t in times.items()})
        ImageFolder(str(big), workers=args.workers)  # writes it
        result['index_load_s'] = timed(lambda: ImageFolder(str(big)))[0]
        for name in ('big', 'small'):
            cfg = DataConfig(root=str(work / name))
            build_datasets(cfg)  # indexes both splits
            result[f'startup_{name}_s'] = statistics.median(
                timed(lambda: build_datasets(cfg))[0] for _ in range(5))
        synthetic_index(work / 'imagenet', args.index_entries)
        result['imagenet_index_load_s'] = statistics.median(
            timed(lambda: ImageFolder(str(work / 'imagenet')))[0] for _ in range(5))
        result['imagenet_index_bytes'] = os.path.getsize(
            index.index_paths((work / 'imagenet').resolve(), '')[0])
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- pipeline -------------------------------------------------------------------------------

def photo_like(rng, width: int, height: int) -> Image.Image:
    """Smooth colour fields with fine noise: a JPEG of about a photograph's size and entropy."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 24, width // 24, 3), np.uint8))
    base = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def jpeg_tree(root: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        w, h = (500, 375) if i % 2 == 0 else (int(rng.integers(500, 801)),
                                              int(rng.integers(375, 601)))
        folder = root / 'train' / f'class{i % 10}'
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng, w, h).save(folder / f'{i:05d}.jpg', quality=90)
    return root


def bench_pipeline(args) -> dict:
    from hydra import compose, initialize_config_dir
    from timm.data import create_dataset, create_transform

    from conformer.data import ImageFolder, SeededTransform, ShardDataset, write_shards
    from conformer.data.transforms import build_transform, pillow_safe
    from conformer.engine.cli import config_dir
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir(), version_base='1.3'):
        cfg = compose('train', overrides=['aug=deit', 'data=imagenet', 'data.root=/x'])
    aug, data = cfg.aug, cfg.data
    work = Path(tempfile.mkdtemp(prefix='bench-pipeline-'))
    try:
        jpeg_tree(work / 'images', args.images)
        folder = ImageFolder(str(work / 'images' / 'train'))
        write_shards(folder, work / 'shards', 'train', samples_per_shard=64)
        shards = ShardDataset(str(work / 'shards'), 'train')
        timm_set = create_dataset('', root=str(work / 'images' / 'train'), split='train',
                                  is_training=True)
        # pillow_safe: timm's own posterize raises at 0 bits on Pillow 13 (see transforms.py)
        timm_set.transform = pillow_safe(create_transform(
            data.input_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip,
            color_jitter=aug.color_jitter, auto_augment=aug.auto_augment,
            interpolation=data.interpolation, mean=tuple(data.mean), std=tuple(data.std),
            re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=aug.re_count))
        ours = build_transform(aug, data, is_training=True)
        keys = [(i, 1000 + i) for i in range(len(folder))]

        def run_timm():
            for i in range(len(timm_set)):
                timm_set[i]

        pipelines = {'timm': run_timm,
                     'imagefolder': lambda: SeededTransform(folder, ours).__getitems__(keys),
                     'shards': lambda: SeededTransform(shards, ours).__getitems__(keys)}
        rates = {name: [] for name in pipelines}
        for name, fn in pipelines.items():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                rates[name].append(len(keys) / timed(fn)[0])
        medians = {name: statistics.median(r) for name, r in rates.items()}
        return dict(images=len(keys), rounds=args.rounds, threads=1,
                    images_per_s_per_core=medians,
                    ratio_to_timm={n: medians[n] / medians['timm'] for n in medians},
                    all_rounds=rates)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='what', required=True)
    listing = sub.add_parser('listing', help='listing and start-up times')
    listing.add_argument('--images', type=int, default=50_000)
    listing.add_argument('--workers', type=int, default=2, help='index-building processes')
    listing.add_argument('--index-entries', type=int, default=1_281_167,
                         help='entries of the synthetic index whose load is timed')
    pipeline = sub.add_parser('pipeline', help='training transform images/s per core')
    pipeline.add_argument('--images', type=int, default=200)
    pipeline.add_argument('--rounds', type=int, default=5)
    for p in (listing, pipeline):
        p.add_argument('--out', help='write the result as JSON to this file')
    args = parser.parse_args(argv)
    result = (bench_listing if args.what == 'listing' else bench_pipeline)(args)
    result.update(cpu=cpu_name(), cores=len(os.sched_getaffinity(0)), torch=torch.__version__,
                  pillow=Image.__version__,
                  command=' '.join(['python tools/bench_input.py', *(argv or sys.argv[1:])]))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
