"""``conformer-export``: a Conformer to ONNX (checked with onnxruntime) and/or a torch.export
program (.pt2), with dynamic batch and image size (see :mod:`conformer.export`); or, with
``--int8``, its post-training int8 model (:mod:`conformer.deploy.quantize`)."""
import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from conformer.cli.common import MODEL_ERRORS, add_model_arguments, model_from_args, output_file
from conformer.export import (
    MISSING_EXTRA,
    check_onnx,
    check_opset,
    check_program,
    export_onnx,
    export_program,
)

__all__ = ['ONNX_PACKAGES', 'missing_onnx_packages', 'main']

ONNX_PACKAGES = ('onnx', 'onnxscript', 'onnxruntime')  # the [export] extra


def missing_onnx_packages() -> List[str]:
    """The packages of the ``[export]`` extra that cannot be imported."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conformer-export`` command.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0, or 1 when the ONNX file differs from PyTorch by more than ``--atol``.
    """
    parser = argparse.ArgumentParser(
        prog='conformer-export',
        description='Export a Conformer to ONNX (checked with onnxruntime) and/or a '
                    'torch.export program (.pt2), with dynamic batch and image size.')
    add_model_arguments(parser, labels=False)
    parser.add_argument('--format', choices=['onnx', 'pt2', 'both'], default='both')
    parser.add_argument('--output', required=True,
                        help='output path; .onnx / .pt2 are appended to it')
    parser.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="size to trace at (default: the model's pretrained_cfg input size)")
    parser.add_argument('--opset', type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--atol', type=float, default=1e-3,
                        help='max abs logit difference onnxruntime may show (default 1e-3)')
    parser.add_argument('--int8', metavar='CALIBRATION',
                        help='write the post-training int8 model instead (.pt2 only; load it '
                             'with conformer.deploy.quantize.load_int8), calibrated on this '
                             'folder of <class>/<image> files (up to 512 of them) at the '
                             "model's eval transform; needs the int8 extra (torchao)")
    args = parser.parse_args(argv)
    if args.image_size and min(args.image_size) < 1:
        parser.error(f'--image-size must be positive, got {" ".join(map(str, args.image_size))}')
    if args.int8 and args.format != 'pt2':
        parser.error('--int8 writes a torch.export program only: add --format pt2 (ONNX '
                     'Runtime and OpenVINO quantize the fp32 ONNX file with their own tools)')
    formats = ('pt2', 'onnx') if args.format == 'both' else (args.format,)
    if 'onnx' in formats:
        missing = missing_onnx_packages()
        if missing:
            parser.error(f'{MISSING_EXTRA} (missing: {", ".join(missing)}); or pass '
                         f'--format pt2 for the torch.export program alone')
        try:  # before the model is built and traced
            check_opset(args.opset)
        except ValueError as e:
            parser.error(str(e))
    # '--output out/model.v2' keeps its '.v2'; an '.onnx' or '.pt2' given with it is dropped
    stem = Path(args.output)
    if not stem.name or stem.is_dir():
        parser.error(f'--output {args.output} is a folder; name the files, e.g. '
                     f'{Path(args.output) / "model"}')
    stem = stem.with_suffix('') if stem.suffix in ('.onnx', '.pt2') else stem
    paths = {f: output_file(parser, stem.with_name(f'{stem.name}.{f}'), '--output',
                            [args.checkpoint])
             for f in formats}
    if args.int8:
        return _export_int8(parser, args, paths['pt2'])
    try:
        model = model_from_args(args)
        size = tuple(args.image_size or model.pretrained_cfg['input_size'][1:])
        program = export_program(model, size)
        check_program(program, model, size)
    except MODEL_ERRORS as e:  # also the model's own input-size errors (ValueError)
        parser.error(str(e))
    if not (args.pretrained or args.checkpoint):
        print('warning: no --pretrained or --checkpoint: exporting randomly initialised '
              'weights', file=sys.stderr)
    if 'pt2' in paths:
        torch.export.save(program, paths['pt2'])
        print(f'wrote {paths["pt2"]}; dynamic ranges: {program.range_constraints}')
    if 'onnx' in paths:
        try:
            export_onnx(model, str(paths['onnx']), size, opset=args.opset, program=program)
        except ValueError as e:
            parser.error(str(e))
        # check at another batch size and image shape than the traced ones
        check_size = (size[0] + model.patch_size, size[1] + 2 * model.patch_size)
        x = torch.randn(3, model.in_chans, *check_size)
        diff = check_onnx(str(paths['onnx']), model, x)
        print(f'wrote {paths["onnx"]}; onnxruntime vs PyTorch at 3x{check_size[0]}x'
              f'{check_size[1]}: max abs logit difference {diff:.2e}')
        if diff > args.atol:
            print(f'error: the ONNX model differs from PyTorch by {diff:.2e} > --atol '
                  f'{args.atol}', file=sys.stderr)
            return 1
    return 0


def _export_int8(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path) -> int:
    """The ``--int8`` export: quantize on the calibration folder, save, and report how the
    int8 model agrees with the float one on those images."""
    from conformer.deploy.quantize import check_quantized, format_check, quantize_int8
    if args.image_size:
        parser.error('--image-size does not apply to --int8: the model is exported at the '
                     'size its eval transform gives the calibration images')
    try:
        model = model_from_args(args)
        quantized = quantize_int8(model, args.int8, compile=False)
    except (*MODEL_ERRORS, ImportError) as e:
        parser.error(str(e))
    quantized.save(path)
    print(f'wrote {path} (int8, calibrated on {quantized.calibration_images} images of '
          f'{"x".join(map(str, quantized.input_shape))}); serve it with '
          f'conformer.deploy.quantize.load_int8')
    print('check on calibration images (check_quantized on held-out images gives the '
          'figures to trust):')
    print(format_check(check_quantized(model, quantized, args.int8, max_images=64)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
