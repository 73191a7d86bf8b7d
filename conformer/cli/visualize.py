"""``conformer-visualize``: the paper's Figure 2 view (both branches' activations) and both
heads' class activation maps for one image, as one figure (see :mod:`conformer.viz`)."""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from conformer.cli.common import (
    MODEL_ERRORS,
    add_model_arguments,
    model_from_args,
    model_inputs,
    output_file,
)
from conformer.data import READ_ERRORS, read_image
from conformer.predict import load_labels
from conformer.viz import (
    branch_activation_maps,
    class_activation_maps,
    conv_trans_blocks,
    plot_maps,
)

__all__ = ['figure_path', 'main']


def figure_path(output: str) -> Path:
    """The file ``--output`` names: '.png' added when it has no suffix, in a format matplotlib
    can write.

    Args:
        output: the ``--output`` value.

    Raises:
        ValueError: matplotlib cannot write that format.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(output)
    if not path.suffix:
        path = path.with_name(path.name + '.png')
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f'--output {output}: matplotlib cannot write {path.suffix!r} files; '
                         f'use one of {", ".join("." + f for f in sorted(formats))}')
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conformer-visualize`` command; returns its exit status, 0.

    Args:
        argv: command-line arguments (``--help`` lists them); None reads ``sys.argv[1:]``.
    """
    from timm.data import create_transform, resolve_data_config

    parser = argparse.ArgumentParser(
        prog='conformer-visualize',
        description="CNN- and transformer-branch activation maps (the paper's Figure 2) and "
                    "both heads' class activation maps for one image, as a PNG.")
    parser.add_argument('image')
    parser.add_argument('--output', required=True,
                        help="figure path ('.png' is added without a suffix; .pdf, .svg, ... "
                             "also work)")
    add_model_arguments(parser)
    parser.add_argument('--block', type=int, help='ConvTransBlock to show (default: the last)')
    parser.add_argument('--class-index', type=int, help='class for the CAMs (default: top-1)')
    args = parser.parse_args(argv)
    try:
        output = figure_path(args.output)
    except ValueError as e:
        parser.error(str(e))
    output_file(parser, output, '--output', [args.image, *model_inputs(args)])
    try:
        model = model_from_args(args)
        labels = load_labels(args.labels, model)
    except MODEL_ERRORS as e:
        parser.error(str(e))
    try:
        image = read_image(args.image, model.in_chans)
    except READ_ERRORS as e:
        parser.error(f'cannot read {args.image}: {e}')
    transform = create_transform(**resolve_data_config(model=model))
    x = transform(image)[None]
    # show the picture the model saw (after resize and centre crop), not the raw file
    shown = create_transform(**dict(resolve_data_config(model=model), mean=(0,) * model.in_chans,
                                    std=(1,) * model.in_chans))(image)
    shown = (shown.permute(1, 2, 0).clamp(0, 1) * 255).byte().squeeze(-1).numpy()
    block = max(conv_trans_blocks(model)) if args.block is None else args.block
    try:
        activations = branch_activation_maps(model, x, block)
        cams = class_activation_maps(model, x, args.class_index)
    except ValueError as e:
        parser.error(str(e))
    class_name = labels[cams['class_index'][0]].split(',')[0]
    plot_maps(shown, activations, cams, class_name, block, str(output))
    print(f'wrote {output} (class: {class_name})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
