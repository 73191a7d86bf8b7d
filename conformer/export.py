"""Export a Conformer to ONNX and to a torch.export program, with dynamic batch and image size.

Both go through ``torch.export`` (ONNX via the dynamo exporter). The batch dim is declared
from 1 up (left to ``Dim.AUTO``, a batch traced at 2 would be recorded as at least 2, and
single images are the common serving case); height and width are ``Dim.AUTO``: export works
out the range the model supports (for example at least 8 px for the nano variant, whose
small stem halves the map three times) and records it in the program. The ONNX file is
checked with onnxruntime against PyTorch on a batch of another size and shape than the one
traced.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

import conformer  # noqa: F401  (registers the variants with timm)
from conformer.predict import create_model

__all__ = ['export_program', 'export_onnx', 'check_onnx', 'main']

DYNAMIC_IMAGE = {'x': {0: Dim('batch', min=1), 2: Dim.AUTO, 3: Dim.AUTO}}
MISSING_EXTRA = ("ONNX export needs the packages onnx, onnxscript and onnxruntime; install them "
                 "with `pip install 'conformer-zoo[export]'`")


def _example(model: nn.Module, batch: int, size: Tuple[int, int]) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *size)


def export_program(model: nn.Module, size: Tuple[int, int] = (224, 224),
                   batch: int = 2) -> ExportedProgram:
    """``torch.export`` of the eval-mode model's ``forward`` (summed logits) with dynamic
    batch (from 1), height and width. Traced at ``batch`` x ``size``; batch 2 because a
    traced size of 1 would be specialised."""
    return torch.export.export(model.eval(), (_example(model, batch, size),),
                               dynamic_shapes=DYNAMIC_IMAGE)


def export_onnx(model: nn.Module, path: str, size: Tuple[int, int] = (224, 224),
                batch: int = 2, opset: Optional[int] = None) -> None:
    """Write ``model`` to the ONNX file ``path`` (input ``images``: N x C x H x W, output
    ``logits``) with dynamic batch, height and width."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e
    program = export_program(model, size, batch)
    onnx_program = torch.onnx.export(program, input_names=['images'], output_names=['logits'],
                                     opset_version=opset, dynamo=True, verbose=False)
    onnx_program.save(path)


def check_onnx(path: str, model: nn.Module, x: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime on ``x``; return the max abs difference from
    PyTorch's logits."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (got,) = session.run(['logits'], {'images': x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    return (torch.from_numpy(got) - want).abs().max().item()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description='Export a Conformer to ONNX (checked with onnxruntime) and/or a '
                    'torch.export program (.pt2), with dynamic batch and image size.')
    parser.add_argument('--model', default='conformer_small_patch16')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true')
    weights.add_argument('--checkpoint', help='a local weights file')
    parser.add_argument('--num-classes', type=int)
    parser.add_argument('--format', choices=['onnx', 'pt2', 'both'], default='both')
    parser.add_argument('--output', required=True,
                        help='output path without suffix; .onnx / .pt2 are added')
    parser.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="size to trace at (default: the model's pretrained_cfg input size)")
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter\'s)')
    parser.add_argument('--atol', type=float, default=1e-3,
                        help='max abs logit difference onnxruntime may show (default 1e-3)')
    args = parser.parse_args(argv)
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    try:
        model = create_model(args.model, args.pretrained, args.checkpoint, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    size = tuple(args.image_size or model.pretrained_cfg['input_size'][1:])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format in ('pt2', 'both'):
        program = export_program(model, size)
        torch.export.save(program, out.with_suffix('.pt2'))
        print(f'wrote {out.with_suffix(".pt2")}; dynamic ranges: {program.range_constraints}')
    if args.format in ('onnx', 'both'):
        path = str(out.with_suffix('.onnx'))
        export_onnx(model, path, size, opset=args.opset)
        # check at another batch size and image shape than the traced ones
        check_size = (size[0] + model.patch_size, size[1] + 2 * model.patch_size)
        diff = check_onnx(path, model, _example(model, 3, check_size))
        print(f'wrote {path}; onnxruntime vs PyTorch at 3x{check_size[0]}x{check_size[1]}: '
              f'max abs logit difference {diff:.2e}')
        if diff > args.atol:
            print(f'error: the ONNX model differs from PyTorch by {diff:.2e} > --atol '
                  f'{args.atol}', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
