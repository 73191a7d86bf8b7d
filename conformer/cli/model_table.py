"""``conformer-model-table``: parameters and MACs of every registered Conformer variant, as a
markdown table (see :mod:`conformer.models.profile` for what is counted)."""
import argparse
import json
import sys
from typing import Optional, Sequence

from conformer.cli.common import output_file
from conformer.models.profile import model_table

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conformer-model-table`` command; returns its exit status, 0.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-model-table',
        description='Parameters and MACs of every Conformer variant.')
    parser.add_argument('--out', help='also write the rows as JSON to this path')
    args = parser.parse_args(argv)
    if args.out:  # the tool reads no files, so the output cannot replace an input
        output_file(parser, args.out, '--out')
    rows = model_table()
    print('| model | input | params (M) | MACs (G) | ImageNet top-1 (published) |')
    print('|---|---|---|---|---|')
    for r in rows:
        top1 = '-' if r['published_top1'] is None else r['published_top1']
        print(f"| {r['model']} | {r['input_size'][-1]} | {r['params_m']} | {r['macs_g']} "
              f"| {top1} |")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
