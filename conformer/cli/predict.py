"""``conformer-predict``: top-k labels with probabilities for image files and folders.

The model runs through :func:`conformer.deploy.optimize_for_inference` (fp32 logits within
1e-4 of the eager model), in a process that keeps freed memory for reuse.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from conformer import runtime
from conformer.cli.common import (
    MODEL_ERRORS,
    add_model_arguments,
    find_images,
    model_from_args,
    model_inputs,
    output_file,
)
from conformer.deploy import optimize_for_inference
from conformer.predict import load_labels, predict

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conformer-predict`` command.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 1 when some files could not be read as images.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-predict', description='Top-k ImageNet (or custom) labels for images.')
    parser.add_argument('inputs', nargs='+',
                        help='image files and/or folders (searched recursively)')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--json', help='also write the results to this file')
    args = parser.parse_args(argv)
    if not (args.pretrained or args.checkpoint):
        parser.error('pass --pretrained or --checkpoint FILE: random weights predict nothing')
    if min(args.topk, args.batch_size, 1 if args.num_classes is None else args.num_classes) < 1:
        parser.error('--topk, --batch-size and --num-classes must be >= 1')
    paths = find_images(args.inputs)
    if args.json:
        output_file(parser, args.json, '--json', [*paths, *model_inputs(args)])
    if not paths:
        parser.error(f'no image files found in {" ".join(args.inputs)}')
    try:
        model = model_from_args(args)
        labels = load_labels(args.labels, model)
    except MODEL_ERRORS as e:
        parser.error(str(e))
    runtime.keep_freed_memory()  # this process is ours: no page faults on every batch
    model = optimize_for_inference(model)
    results = []
    for result in predict(model, paths, labels, args.topk, args.batch_size):
        results.append(result)
        if 'error' in result:
            print(f"{result['path']}: cannot read: {result['error']}", file=sys.stderr)
            continue
        print(result['path'])
        for label, prob in result['top']:
            print(f'  {prob:7.2%}  {label}')
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = sum('error' in r for r in results)
    if failed:
        print(f'{failed} of {len(results)} files could not be read', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
