"""Export a Conformer to ONNX and to a torch.export program, with dynamic batch and image size.

Both go through ``torch.export`` (ONNX via the dynamo exporter). The batch dim is declared
from 1 up (left to ``Dim.AUTO``, a batch traced at 2 would be recorded as at least 2, and
single images are the common serving case); height and width are ``Dim.AUTO``: export works
out the range the model supports (for example at least 8 px for the nano variant, whose
small stem halves the map three times) and records it in the program. The ONNX file is
checked with onnxruntime against PyTorch on a batch of another size and shape than the one
traced.

Two ops get ONNX translations of their own, so the file keeps PyTorch's results at every size:
the exporter's adaptive average pooling unrolls windows whose count and length it reads off
the traced size, and ONNX ``Resize`` rounds some nearest-neighbour source pixels differently
from PyTorch. Here pooling is two matrix products with window weights built from the input's
shape, and nearest resizing gathers the rows and columns PyTorch reads.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

import conformer  # noqa: F401  (registers the variants with timm)

__all__ = ['export_program', 'check_program', 'export_onnx', 'check_onnx']

DYNAMIC_IMAGE = {'x': {0: Dim('batch', min=1), 2: Dim.AUTO, 3: Dim.AUTO}}
MISSING_EXTRA = ('ONNX export needs the packages onnx, onnxscript and onnxruntime; install them '
                 'with `pip install "conformer-zoo[export]"`, or in a source checkout with '
                 '`pip install -e ".[export]"`')


def _example(model: nn.Module, batch: int, size: Tuple[int, int]) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *size)


def export_program(model: nn.Module, size: Tuple[int, int] = (224, 224),
                   batch: int = 2) -> ExportedProgram:
    """``torch.export`` of the eval-mode model's ``forward`` (summed logits) with dynamic
    batch (from 1), height and width.

    Args:
        model: the model; put in eval mode.
        size: (height, width) of the traced example.
        batch: batch of the traced example; 2 because a traced size of 1 would be specialised.
    """
    return torch.export.export(model.eval(), (_example(model, batch, size),),
                               dynamic_shapes=DYNAMIC_IMAGE)


def check_program(program: ExportedProgram, model: nn.Module,
                  size: Tuple[int, int]) -> None:
    """Refuse a program traced at an image size too small to generalise: export derives the
    sizes it takes from the traced one, and a trace at a few pixels can yield a program for
    only those (e.g. 5-8 px). It must take the model's own input size.

    Args:
        program: the exported program.
        model: the model it was exported from (its ``pretrained_cfg`` gives the input size).
        size: (height, width) the program was traced at, for the error message.

    Raises:
        ValueError: the program does not take the model's input size.
    """
    default = tuple(model.pretrained_cfg['input_size'][1:])
    try:
        with torch.no_grad():
            program.module()(_example(model, 1, default))
    except Exception as e:  # torch.export guard failures have no common public type
        raise ValueError(f'traced at {size[0]}x{size[1]}, the exported program does not take '
                         f"the model's {default[0]}x{default[1]} input "
                         f'({str(e).splitlines()[0][:160]}); trace at a larger --image-size '
                         f'(default: {default[0]} {default[1]})') from None


def _onnx_translations() -> dict:
    """ONNX Script translations of the size-dependent ops, keyed by the ATen op they replace.
    Sizes arrive as ints or as INT64 scalars of the graph."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    rows, cols = [1], [0]  # Unsqueeze axes

    def sizes(x, output_size, axis):
        """(input size, output size) along spatial ``axis`` (0: height, 1: width)."""
        size_in = op.Gather(op.Shape(x), 2 + axis)
        size_out = output_size[axis]
        return size_in, op.Constant(value_int=size_out) if isinstance(size_out, int) else size_out

    def pool_weights(size_in, size_out, like):
        """(out, in) matrix: row i averages inputs [floor(i*in/out), ceil((i+1)*in/out)),
        PyTorch's adaptive pooling windows."""
        i = op.Range(0, size_out, 1)
        start = op.Div(op.Mul(i, size_in), size_out)
        end = op.Div(op.Sub(op.Add(op.Mul(op.Add(i, 1), size_in), size_out), 1), size_out)
        j = op.Unsqueeze(op.Range(0, size_in, 1), cols)
        inside = op.And(op.GreaterOrEqual(j, op.Unsqueeze(start, rows)),
                        op.Less(j, op.Unsqueeze(end, rows)))
        return op.Div(op.CastLike(inside, like),
                      op.Unsqueeze(op.CastLike(op.Sub(end, start), like), rows))

    def adaptive_avg_pool2d(x, output_size):
        weights_h = pool_weights(*sizes(x, output_size, 0), x)
        weights_w = pool_weights(*sizes(x, output_size, 1), x)
        return op.MatMul(op.MatMul(weights_h, x), op.Transpose(weights_w, perm=[1, 0]))

    def nearest_index(size_in, size_out):
        """PyTorch's source index: min(floor(i * float(in / out)), in - 1) in float32."""
        scale = op.Div(op.Cast(size_in, to=FLOAT.dtype), op.Cast(size_out, to=FLOAT.dtype))
        source = op.Floor(op.Mul(op.Cast(op.Range(0, size_out, 1), to=FLOAT.dtype), scale))
        return op.Min(op.Cast(source, to=INT64.dtype), op.Sub(size_in, 1))

    def upsample_nearest2d(x, output_size, *scales):
        if output_size is None or any(s is not None for s in scales):
            raise ValueError('nearest resizing by a scale factor is not supported by the ONNX '
                             'export; resize to an explicit size')
        x = op.Gather(x, nearest_index(*sizes(x, output_size, 0)), axis=2)
        return op.Gather(x, nearest_index(*sizes(x, output_size, 1)), axis=3)

    aten = torch.ops.aten
    return {aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            aten._adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            aten.upsample_nearest2d.default: upsample_nearest2d,
            aten.upsample_nearest2d.vec: upsample_nearest2d}


# the oldest opset the export reaches: torch.onnx's dynamo exporter writes 18 and converts
# down with onnx's version converter, which reaches 17 for this model and fails for 16 only
# after minutes of work
MIN_OPSET = 17


def check_opset(opset: Optional[int]) -> None:
    """Refuse, before any work, an ONNX opset the export cannot write.

    Args:
        opset: the requested opset; None (the exporter's default) always passes.

    Raises:
        ImportError: onnx or onnxscript is not installed.
        ValueError: `opset` is below `MIN_OPSET` or newer than the installed onnx knows.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise ValueError(f'--opset {opset}: the export writes opsets {MIN_OPSET} to {newest} '
                         f'(the installed onnx package knows opsets up to {newest}); pick one '
                         f'in that range or leave --opset out')


def export_onnx(model: nn.Module, path: str, size: Tuple[int, int] = (224, 224),
                batch: int = 2, opset: Optional[int] = None,
                program: Optional[ExportedProgram] = None) -> None:
    """Write ``model`` to the ONNX file ``path`` (input ``images``: N x C x H x W, output
    ``logits``) with dynamic batch, height and width.

    Args:
        model: the model to export.
        path: the ONNX file to write.
        size: (height, width) of the traced example, as for `export_program`.
        batch: batch of the traced example, as for `export_program`.
        opset: the ONNX opset; None means the exporter's default.
        program: an already exported program of ``model`` to convert; None exports one.

    Raises:
        ImportError: onnx or onnxscript is not installed.
        ValueError: an opset the export cannot write (see `check_opset`), or the exporter
            could not convert to ``opset`` (an error, not a silent fallback).
    """
    check_opset(opset)
    program = program or export_program(model, size, batch)
    onnx_program = torch.onnx.export(program, input_names=['images'], output_names=['logits'],
                                     opset_version=opset, dynamo=True, verbose=False,
                                     custom_translation_table=_onnx_translations())
    written = next(o.version for o in onnx_program.model_proto.opset_import if o.domain == '')
    if opset is not None and written != opset:
        raise ValueError(f'--opset {opset}: the exporter could not convert the model to that '
                         f'opset (it produced opset {written}); use --opset {written} or '
                         f'leave --opset out')
    onnx_program.save(path)


def check_onnx(path: str, model: nn.Module, x: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime on ``x``; return the max abs difference from
    PyTorch's logits.

    Args:
        path: the ONNX file.
        model: the PyTorch model it was exported from; put in eval mode.
        x: the input batch (on the CPU).

    Raises:
        ImportError: onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(MISSING_EXTRA) from e
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (got,) = session.run(['logits'], {'images': x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    return (torch.from_numpy(got) - want).abs().max().item()
