"""``conformer-convert``: Conformer weights in any supported format to a folder ready for the
Hugging Face Hub (see :mod:`conformer.weights.convert`)."""
import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from conformer.cli.common import model_args
from conformer.cli.outputs import refuse_inputs
from conformer.weights import DownloadError
from conformer.weights.convert import OUT_FILES, convert

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``conformer-convert`` command; returns its exit status, 0.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-convert',
        description='Convert Conformer weights (paper .pth, DeiT-style or conformer-zoo '
                    'training checkpoints, mmpretrain .pth, safetensors; a file, folder, URL, '
                    'hf-hub:ORG/NAME or local-dir:FOLDER) into a Hugging Face Hub folder: '
                    'model.safetensors + config.json + README.md.')
    parser.add_argument('source', help='weights to convert')
    parser.add_argument('out_dir', help='folder to write')
    parser.add_argument('--model', help='timm model name (default: recognised from the file)')
    parser.add_argument('--model-args', metavar='KEY=VALUE,...', type=model_args,
                        help='architecture settings the weights were trained with (e.g. '
                             'embed_dim=64,num_heads=2), for weights that do not record them')
    parser.add_argument('--no-ema', dest='use_ema', action='store_false',
                        help='take the raw weights of a checkpoint that also holds EMA weights')
    parser.add_argument('--top1', type=float, help='top-1 accuracy (%%) for the model card')
    parser.add_argument('--dataset', help='dataset the weights were trained on, for the card')
    parser.add_argument('--license', help="license of the weights (default: the variant's)")
    parser.add_argument('--repo-id', help='ORG/NAME the folder will be published as')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace model.safetensors, config.json and README.md if out_dir '
                             'already holds them (default: refuse, so a README is never lost)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    source = args.source.removeprefix('local-dir:')
    try:
        for name in OUT_FILES:  # even with --overwrite, never the weights being converted
            refuse_inputs(Path(args.out_dir) / name, 'out_dir', [source])
        convert(args.source, args.out_dir, model_name=args.model,
                model_kwargs=args.model_args, use_ema=args.use_ema,
                top1=args.top1, dataset=args.dataset, license=args.license,
                repo_id=args.repo_id, overwrite=args.overwrite)
    except (ValueError, DownloadError) as e:  # CheckpointError is a ValueError
        parser.exit(2, f'conformer-convert: error: {e}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
