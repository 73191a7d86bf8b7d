"""Classify image files: top-k labels with probabilities (``conformer-predict`` runs this).

Images are read as the training data is (:func:`conformer.data.read_image`: EXIF orientation,
high bit depths, transparency) and go through the model's own ``pretrained_cfg`` eval transform
(resize, centre crop, normalisation) in batches. A file that cannot be read as an image is
reported and skipped; the rest are still classified.
"""
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import timm
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torch import nn

import conformer  # noqa: F401  (registers the variants with timm)
from conformer.data import READ_ERRORS, read_image
from conformer.models import check_model_name
from conformer.weights import model_from_weights

__all__ = ['DEFAULT_MODEL', 'create_model', 'load_labels', 'predict']

DEFAULT_MODEL = 'conformer_small_patch16'


def create_model(name: Optional[str] = None, pretrained: bool = False,
                 checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model to run, in eval mode.

    Args:
        name: a registered variant; default ``conformer_small_patch16``, or with
            ``checkpoint`` the one the weights record (a different one is an error).
        pretrained: load the variant's released ImageNet weights (ignored with
            ``checkpoint``).
        checkpoint: weights to run, as the tools' ``--checkpoint`` takes them: a weights file
            in any supported format (a conformer-train checkpoint, the paper's, mmpretrain's,
            safetensors), a model folder, a URL or ``hf-hub:ORG/NAME``. The model is rebuilt
            as those weights were trained, with the preprocessing and class names they record
            (:func:`conformer.weights.model_from_weights`).
        num_classes: the class count; with ``checkpoint`` only checked against the file.
        model_kwargs: architecture settings over the variant's (embed_dim=64, ...), and over
            what the weights record: weights of a custom architecture that they do not
            record need them.
    """
    if checkpoint is not None:  # model_from_weights checks the name itself
        return model_from_weights(checkpoint, model_name=name, num_classes=num_classes,
                                  model_kwargs=model_kwargs)[0]
    kwargs = dict(model_kwargs or {}, **({} if num_classes is None else
                                         dict(num_classes=num_classes)))
    return timm.create_model(check_model_name(name or DEFAULT_MODEL), pretrained=pretrained,
                             **kwargs).eval()


def load_labels(spec: str, model: nn.Module) -> List[str]:
    """One label per class of ``model``.

    Args:
        spec: 'auto' (the class names recorded with its weights, else ImageNet's for 1000
            classes, else class indices), 'imagenet' (timm's ImageNet-1k descriptions),
            'none' (class indices) or a text file with one label per line.
        model: the model whose classes are labelled.

    Raises:
        ValueError: the labels do not match the model's class count, or ``spec`` is a folder.
        FileNotFoundError: the labels file does not exist.
    """
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


def predict(model: nn.Module, paths: Sequence[Path], labels: Sequence[str], topk: int = 5,
            batch_size: int = 16) -> Iterator[dict]:
    """Yield, in input order, ``{'path', 'top': [(label, probability), ...]}`` for each image
    or ``{'path', 'error'}`` for each file that could not be read.

    Args:
        model: the model, in eval mode; its ``pretrained_cfg`` gives the eval transform.
        paths: the image files.
        labels: one label per class (see `load_labels`).
        topk: classes reported per image (at most the number of labels).
        batch_size: images per forward pass.
    """
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
