"""What the command-line tools share: the model and weights options, finding images, and
output paths checked before any work."""
import argparse
import ast
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from torch import nn

from conformer.cli.outputs import writable_file
from conformer.data import IMAGE_SUFFIXES
from conformer.predict import DEFAULT_MODEL, create_model
from conformer.weights import DownloadError

__all__ = ['MODEL_ERRORS', 'add_model_arguments', 'find_images', 'model_args', 'model_from_args',
           'model_inputs', 'output_file']

# what create_model raises for a bad name, weights file or source (the message says which)
MODEL_ERRORS = (ValueError, OSError, DownloadError)
LABEL_CHOICES = ('auto', 'imagenet', 'none')


def add_model_arguments(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    """The options predict, export and visualize choose their model (and labels) with.

    Args:
        parser: the tool's parser.
        labels: also add ``--labels`` (tools that print class names).
    """
    parser.add_argument('--model', help=f'a registered variant (default: {DEFAULT_MODEL}, or '
                                        f'with --checkpoint the one the weights record)')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true',
                         help="the variant's released ImageNet weights (downloaded once)")
    weights.add_argument('--checkpoint',
                         help='weights to run: a file (conformer-train, the paper, mmpretrain, '
                              'safetensors), a model folder, a URL or hf-hub:ORG/NAME; the '
                              'classes and preprocessing they were trained with come along')
    parser.add_argument('--model-args', metavar='KEY=VALUE,...', type=model_args,
                        help="architecture settings over the variant's (and the recorded) "
                             'ones, e.g. embed_dim=64,num_heads=2,stem_type=pooled: weights of '
                             'a custom architecture that they do not record need them')
    parser.add_argument('--num-classes', type=int,
                        help="the class count (default: the weights'; with --checkpoint it is "
                             "only checked against the file)")
    if labels:
        parser.add_argument('--labels', default='auto',
                            help="'auto' (the class names recorded with the weights, else "
                                 "ImageNet's for 1000 classes, else class indices), 'imagenet', "
                                 "'none' (class indices) or a text file with one label per line")


def model_args(text: str) -> Dict[str, Any]:
    """``--model-args``: ``KEY=VALUE,...``, each value read as a Python literal when it is one
    (64, 4.0, None) and as text otherwise (pooled)."""
    kwargs = {}
    for item in text.split(','):
        key, sep, value = item.strip().partition('=')
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f'{item!r} is not KEY=VALUE (e.g. '
                                             f'embed_dim=64,num_heads=2)')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """:func:`conformer.predict.create_model` for the options of :func:`add_model_arguments`.

    Args:
        args: the parsed options (``model``, ``pretrained``, ``checkpoint``, ``num_classes``,
            ``model_args``).
    """
    return create_model(args.model, args.pretrained, args.checkpoint, args.num_classes,
                        args.model_args)


def model_inputs(args: argparse.Namespace) -> List[str]:
    """The local files and folders the options of :func:`add_model_arguments` read: the
    ``--checkpoint`` and a ``--labels`` file (URLs and hub names are skipped by the checks).

    Args:
        args: the parsed options.
    """
    labels = getattr(args, 'labels', None)
    return [p for p in (args.checkpoint, None if labels in LABEL_CHOICES else labels) if p]


def find_images(paths: Sequence[Union[str, Path]]) -> List[Path]:
    """Files given directly (whatever their suffix, so a bad one gets reported) plus every
    image file under the given folders, sorted.

    Args:
        paths: files and folders (searched recursively).
    """
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob('*')
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return found


def output_file(parser: argparse.ArgumentParser, path: Union[str, Path], flag: str,
                inputs: Iterable[Optional[Union[str, Path]]] = ()) -> Path:
    """:func:`conformer.cli.outputs.writable_file`, a usage error (exit status 2) if it fails.

    Args:
        parser: the tool's parser, which reports the error.
        path: the output file.
        flag: the option that named it.
        inputs: the files and folders the tool reads, which ``path`` must not replace.
    """
    try:
        return writable_file(path, flag, inputs)
    except ValueError as e:
        parser.error(str(e))
