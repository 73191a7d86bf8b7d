"""Classify image files and folders: top-k labels with probabilities.

Images go through the model's own ``pretrained_cfg`` eval transform (resize, centre crop,
normalisation) in batches. The command line runs the model through
:func:`conformer.deploy.optimize_for_inference` (fp32 logits within 1e-4 of the eager model),
in a process that keeps freed memory for reuse. A file that cannot be read as an image is
reported and skipped; the rest are still classified.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image
from torch import nn

import timm
from timm.data import ImageNetInfo, create_transform, resolve_data_config
import conformer  # noqa: F401  (registers the variants with timm)
from conformer import runtime
from conformer.data.folder import to_mode
from conformer.deploy import optimize_for_inference
from conformer.models import check_model_name
from conformer.outputs import writable_file
from conformer.weights import DownloadError, model_from_weights

__all__ = ['MODEL_ERRORS', 'READ_ERRORS', 'add_model_arguments', 'create_model', 'find_images',
           'load_labels', 'model_from_args', 'predict', 'read_image', 'main']

DEFAULT_MODEL = 'conformer_small_patch16'
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                  '.pgm'}


def create_model(name: Optional[str] = None, pretrained: bool = False,
                 checkpoint: Optional[str] = None,
                 num_classes: Optional[int] = None) -> nn.Module:
    """The model to run, in eval mode.

    With ``checkpoint`` (a file in any supported format, a model folder, a URL or
    ``hf-hub:ORG/NAME``), the model those weights were trained as, with the preprocessing and
    class names they record (:func:`conformer.weights.model_from_weights`); ``name`` and
    ``num_classes`` are then checked against the file. Otherwise timm's ``name`` (default
    ``conformer_small_patch16``), with its released weights if ``pretrained``.
    """
    if checkpoint is not None:  # model_from_weights checks the name itself
        return model_from_weights(checkpoint, model_name=name, num_classes=num_classes)[0]
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    return timm.create_model(check_model_name(name or DEFAULT_MODEL), pretrained=pretrained,
                             **kwargs).eval()


def add_model_arguments(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    """The options predict, export and visualize choose their model (and labels) with."""
    parser.add_argument('--model', help=f'a registered variant (default: {DEFAULT_MODEL}, or '
                                        f'with --checkpoint the one the weights record)')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true',
                         help="the variant's released ImageNet weights (downloaded once)")
    weights.add_argument('--checkpoint',
                         help='weights to run: a file (conformer-train, the paper, mmpretrain, '
                              'safetensors), a model folder, a URL or hf-hub:ORG/NAME; the '
                              'classes and preprocessing they were trained with come along')
    parser.add_argument('--num-classes', type=int,
                        help="the class count (default: the weights'; with --checkpoint it is "
                             "only checked against the file)")
    if labels:
        parser.add_argument('--labels', default='auto',
                            help="'auto' (the class names recorded with the weights, else "
                                 "ImageNet's for 1000 classes, else class indices), 'imagenet', "
                                 "'none' (class indices) or a text file with one label per line")


# what create_model raises for a bad name, weights file or source (the message says which)
MODEL_ERRORS = (ValueError, OSError, DownloadError)


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """:func:`create_model` for the options of :func:`add_model_arguments`."""
    return create_model(args.model, args.pretrained, args.checkpoint, args.num_classes)


def find_images(paths: Sequence[str]) -> List[Path]:
    """Files given directly (whatever their suffix, so a bad one gets reported) plus every
    image file under the given folders, sorted."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob('*')
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return found


def load_labels(spec: str, model: nn.Module) -> List[str]:
    """One label per class of ``model``: 'auto' (the class names recorded with its weights,
    else ImageNet's for 1000 classes, else class indices), 'imagenet' (timm's ImageNet-1k
    descriptions), 'none' (class indices) or a text file with one label per line."""
    num_classes = model.num_classes
    recorded = model.pretrained_cfg.get('label_names')
    if spec == 'auto':
        if recorded and len(recorded) == num_classes:
            return list(recorded)
        spec = 'imagenet' if num_classes == 1000 else 'none'
    if spec == 'imagenet':
        if num_classes != 1000:
            raise ValueError(f'--labels imagenet names 1000 classes but the model has '
                             f'{num_classes}; pass --labels FILE (one label per line) or none')
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    if spec == 'none':
        return [str(i) for i in range(num_classes)]
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f'--labels {spec} is a folder; pass a text file with one label per '
                         f'line (or auto, imagenet, none)')
    if not path.is_file():
        raise FileNotFoundError(f'labels file {spec} does not exist; pass auto, imagenet, none '
                                f'or a text file with one label per line')
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ValueError(f'labels file {spec} has {len(labels)} labels but the model has '
                         f'{num_classes} classes')
    return labels


# what a damaged, unsupported or oversized (PIL's decompression-bomb guard) file raises
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def read_image(path: Union[str, Path], in_chans: int) -> Image.Image:
    """An image file in the model's input mode, converted as the training data is
    (:func:`conformer.data.folder.to_mode`: 16-bit scaled to 8 bits, transparency on white)."""
    with Image.open(path) as img:
        img.load()
        return to_mode(img, in_chans)


def predict(model: nn.Module, paths: Sequence[Path], labels: Sequence[str], topk: int = 5,
            batch_size: int = 16) -> Iterator[dict]:
    """Yield, in input order, ``{'path', 'top': [(label, probability), ...]}`` for each image
    or ``{'path', 'error'}`` for each file that could not be read."""
    transform = create_transform(**resolve_data_config(model=model))
    topk = min(topk, len(labels))
    for start in range(0, len(paths), batch_size):
        chunk, tensors = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(transform(read_image(path, model.in_chans)))
                chunk.append(dict(path=str(path)))
            except READ_ERRORS as e:
                chunk.append(dict(path=str(path), error=f'{type(e).__name__}: {e}'))
        if tensors:
            with torch.no_grad():
                probs = model(torch.stack(tensors)).float().softmax(-1)
            values, indices = probs.topk(topk, dim=-1)
            ok = iter(zip(values.tolist(), indices.tolist()))
            for result in chunk:
                if 'error' not in result:
                    v, i = next(ok)
                    result['top'] = [(labels[c], p) for p, c in zip(v, i)]
        yield from chunk


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Top-k ImageNet (or custom) labels for images.')
    parser.add_argument('inputs', nargs='+', help='image files and/or folders (searched recursively)')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--json', help='also write the results to this file')
    args = parser.parse_args(argv)
    if not (args.pretrained or args.checkpoint):
        parser.error('pass --pretrained or --checkpoint FILE: random weights predict nothing')
    if min(args.topk, args.batch_size, 1 if args.num_classes is None else args.num_classes) < 1:
        parser.error('--topk, --batch-size and --num-classes must be >= 1')
    if args.json:
        try:
            writable_file(args.json, '--json')
        except ValueError as e:
            parser.error(str(e))
    paths = find_images(args.inputs)
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
