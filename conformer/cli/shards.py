"""``conformer-shards``: write an image folder as tar shards in timm's wds/ layout, or build the
index of a folder or of shards once, before a multi-process run reads it
(see :mod:`conformer.data.shards` and :mod:`conformer.data.index`)."""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from conformer.data import ImageFolder, ShardDataset, write_shards
from conformer.data.shards import read_info

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``conformer-shards`` command; returns its exit status, 0.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-shards',
        description="Tar shards in timm's wds/ layout (<key>.jpg + <key>.cls, _info.json) from "
                    'an image folder, and the listing indexes training reads.')
    commands = parser.add_subparsers(dest='command', required=True)
    write = commands.add_parser(
        'write', help='write <root>/<split>/<class>/* as shards of each split')
    write.add_argument('root', help='the folder holding one folder per split (train/, val/)')
    write.add_argument('out', help='the folder to write the shards and _info.json into')
    write.add_argument('--splits', nargs='+', default=['train', 'val'],
                       help='split folders under root (default: train val)')
    write.add_argument('--samples-per-shard', type=int, default=1000,
                       help='images per tar file (default: 1000, ~110 MB of ImageNet JPEGs)')
    write.add_argument('--prefix', default='shards', help='start of the shard file names')
    write.add_argument('--seed', type=int, default=0, help='seed of the order within shards')
    write.add_argument('--unlabelled', action='store_true',
                       help='every image under each split folder at any depth, without .cls')
    index = commands.add_parser(
        'index', help='build the index of an image folder (or of shards) now, in one process')
    index.add_argument('folder', help='an image folder, or a shard folder with _info.json')
    index.add_argument('--unlabelled', action='store_true',
                       help='list every image at any depth (data.labelled=false)')
    for sub in (write, index):
        sub.add_argument('--workers', type=int,
                         help='processes opening headers (default: the usable cores, up to 16)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        if args.command == 'write':
            if args.samples_per_shard < 1:
                parser.error('--samples-per-shard must be >= 1')
            for split in args.splits:
                folder = ImageFolder(str(Path(args.root) / split), strict=False,
                                     labelled=not args.unlabelled, workers=args.workers)
                entry = write_shards(folder, Path(args.out), split, args.samples_per_shard,
                                     args.prefix, args.seed)
                print(f'{split}: {entry["num_samples"]} images in {len(entry["filenames"])} '
                      f'shards under {args.out}')
            return 0
        folder = Path(args.folder)
        if (folder / '_info.json').is_file() or (folder / 'info.json').is_file():
            for split in read_info(folder)[1].get('splits', {}):
                print(f'{split}: {len(ShardDataset(str(folder), split, workers=args.workers))} '
                      f'samples indexed')
        else:
            listed = ImageFolder(str(folder), labelled=not args.unlabelled, workers=args.workers)
            print(f'{len(listed)} images indexed under {folder}')
    except (ValueError, OSError) as e:
        parser.exit(2, f'conformer-shards: error: {e}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
