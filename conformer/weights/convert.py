"""Turn Conformer weights in any supported format into a folder ready for the Hugging Face Hub.

The folder holds ``model.safetensors`` (the paper's key names), timm's ``config.json`` (so
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` or ``'local-dir:FOLDER'`` rebuilds
the model) and ``README.md``, a model card with the source file and its sha256, results and
license. Publish it with ``hf upload ORG/NAME FOLDER``. Command line: ``conformer-convert``
(``tools/convert.py``).

The variant is taken from ``--model``, else recognised from the file: one of the hosted
``.in1k`` releases by name, the model name a training run recorded (``meta['variant']`` in
conformer-train checkpoints, ``args.model`` in DeiT-style ones, timm's ``arch``), a converted
folder's ``config.json``, or a variant name inside the file name (the paper's
``Conformer_small_patch16.pth``). num_classes and in_chans come from the weights themselves.
From conformer-train checkpoints the card and config also take ``meta['model_kwargs']``, the
class names, the input size, mean and std, and the eval top-1 recorded with the weights.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import timm
import torch
from timm.models import get_pretrained_cfg, save_for_hf

from conformer.models.conformer import checkpoint_filter_fn

from .checkpoint import EMA_KEYS, Checkpoint, CheckpointError, read_checkpoint
from .download import DownloadError, sha256_file
from .loading import describe_architecture, load_state_dict_checked, weights_file

__all__ = ['convert', 'known_release', 'main']

_logger = logging.getLogger(__name__)

# wrappers around the paper's key names: DDP, torch.compile, mmpretrain
_KEY_PREFIXES = ('module.', '_orig_mod.', 'backbone.', 'head.')

PAPER = ('Conformer: Local Features Coupling Global Representations for Visual Recognition '
         '(Peng et al., ICCV 2021, arXiv:2105.03889)')
CITATION = """@inproceedings{peng2021conformer,
  title={Conformer: Local Features Coupling Global Representations for Visual Recognition},
  author={Peng, Zhiliang and Huang, Wei and Gu, Shanzhi and Xie, Lingxi and Wang, Yaowei and Jiao, Jianbin and Ye, Qixiang},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2021}
}"""


def known_release(filename: str) -> Optional[str]:
    """The pretrained tag ('conformer_tiny_patch16.in1k') whose hosted file is `filename`."""
    for name in timm.list_pretrained('conformer*'):
        url = get_pretrained_cfg(name).url
        if url and os.path.basename(url) == filename:
            return name
    return None


def convert(source: Union[str, Path], out_dir: Union[str, Path], model_name: Optional[str] = None,
            use_ema: bool = True, top1: Optional[float] = None, dataset: Optional[str] = None,
            license: Optional[str] = None, repo_id: Optional[str] = None,
            cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write `out_dir` (model.safetensors, config.json, README.md) from the weights at `source`
    (a file, folder, URL, ``hf-hub:`` or ``local-dir:`` name) and return it."""
    checkpoint = read_checkpoint(weights_file(source, cache_dir), use_ema=use_ema)
    release = known_release(checkpoint.path.name)
    name = model_name or release or _recorded_architecture(checkpoint)
    if name.split('.')[0] not in timm.list_models('conformer*'):
        raise ValueError(f"unknown model {name!r}; pass one of {timm.list_models('conformer*')}")
    if release and name.split('.')[0] != release.split('.')[0]:
        release = None
    num_classes, in_chans = _trained_heads_and_stem(checkpoint.state_dict)
    meta = checkpoint.meta
    model_args = dict(meta.get('model_kwargs') or {}, num_classes=num_classes, in_chans=in_chans)
    model = timm.create_model(name, **model_args)
    load_state_dict_checked(model, checkpoint_filter_fn(checkpoint.state_dict, model),
                            str(checkpoint.path))
    if release is None:
        # the variant's default cfg describes other weights: drop its tag, results and origin
        model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items()
                                if k not in ('tag', 'notes', 'description')}
    if license:
        model.pretrained_cfg['license'] = license

    out_dir = Path(out_dir)
    # conformer-train records the class names and the preprocessing it trained with
    if 'input_size' in meta:
        size = meta['input_size']
        model.pretrained_cfg['input_size'] = (in_chans, *((size, size) if isinstance(size, int)
                                                          else tuple(size)[-2:]))
    model.pretrained_cfg.update({k: tuple(meta[k]) for k in ('mean', 'std') if k in meta})
    save_for_hf(model, out_dir, model_args=model_args, safe_serialization=True,
                model_config=dict(label_names=meta['classes']) if meta.get('classes') else None)
    card = model_card(model, checkpoint, release, top1=top1, dataset=dataset,
                      repo_id=repo_id or f'ORG/{out_dir.resolve().name}')
    (out_dir / 'README.md').write_text(card, encoding='utf-8')
    _logger.info(f'Wrote {out_dir}/ (model.safetensors, config.json, README.md); publish with: '
                 f'hf upload {repo_id or "ORG/NAME"} {out_dir}')
    return out_dir


def _recorded_architecture(checkpoint: Checkpoint) -> str:
    """The variant a checkpoint names: its training record, the config.json of its folder
    (a converted model), or its file name."""
    conformers = timm.list_models('conformer*')
    config = checkpoint.path.parent / 'config.json'
    folder_arch = json.loads(config.read_text()).get('architecture') if config.is_file() else None
    for recorded in (checkpoint.architecture, folder_arch):
        if recorded and recorded.lower().split('.')[0] in conformers:
            return recorded.lower().split('.')[0]
    in_name = [n for n in conformers if n in checkpoint.path.name.lower()]
    if len(in_name) == 1:
        return in_name[0]
    plain = {_strip_prefixes(k): v for k, v in checkpoint.state_dict.items()}
    raise CheckpointError(
        f'{checkpoint.path}: cannot tell which Conformer variant these weights are '
        f'({describe_architecture(plain)}); pass --model, one of {conformers}')


def _strip_prefixes(key: str) -> str:
    while key.startswith(_KEY_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def _trained_heads_and_stem(state_dict: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """num_classes (0 without heads) and in_chans the weights were trained with."""
    plain = {_strip_prefixes(k): v for k, v in state_dict.items()}
    head = plain.get('conv_cls_head.weight')
    stem = plain.get('conv1.weight')
    return (head.shape[0] if head is not None else 0), (stem.shape[1] if stem is not None else 3)


def model_card(model: torch.nn.Module, checkpoint: Checkpoint, release: Optional[str],
               top1: Optional[float] = None, dataset: Optional[str] = None,
               repo_id: str = 'ORG/NAME') -> str:
    """A Hub model card: front matter, details with the source's sha256, results, usage."""
    cfg = model.pretrained_cfg
    dataset = dataset or ('imagenet-1k' if release else None)
    results: List[str] = list(cfg.get('notes') or ()) if release else []
    results += _recorded_results(checkpoint)
    if top1 is not None:
        results.append(f'top-1 {top1:.2f}%' + (f' on {dataset}' if dataset else ''))
    weights_from = (f"the {checkpoint.weights_key!r} entry" if checkpoint.weights_key
                    else 'the state_dict')
    params = sum(p.numel() for p in model.parameters()) / 1e6
    front = ['---', 'tags:', '- image-classification', '- timm', '- conformer',
             'library_name: timm', f"license: {cfg.get('license', 'other')}"]
    if dataset:
        front += ['datasets:', f'- {dataset}']
    front.append('---')
    details = [
        f"- **Architecture:** `{cfg['architecture']}`, {params:.2f}M parameters",
        f"- **Classes:** {model.num_classes}; **input:** {'x'.join(map(str, cfg['input_size']))}, "
        f"{cfg['interpolation']} resize, crop_pct {cfg['crop_pct']}",
        f'- **Source file:** `{checkpoint.path.name}` (sha256 `{sha256_file(checkpoint.path)}`), '
        f'weights from {weights_from}',
    ]
    if release:
        details.append(f"- **Origin:** {get_pretrained_cfg(release).url} (mmpretrain's "
                       f"conversion of the paper's release, {cfg.get('origin_url')})")
    details += [f"- **License:** {cfg.get('license', 'not stated')}", f'- **Paper:** {PAPER}']
    usage = (f"```python\nimport conformer  # registers the Conformer models with timm\n"
             f"import timm\n\nmodel = timm.create_model('hf-hub:{repo_id}', pretrained=True)"
             f".eval()\ntransform = timm.data.create_transform(\n"
             f"    **timm.data.resolve_data_config({{}}, model=model))\n```")
    return '\n'.join(front + [
        f'# Model card for {repo_id.split("/")[-1]}', '',
        f"Conformer image classifier (`{cfg['architecture']}`), converted with conformer-zoo's "
        f'`conformer-convert`.', '', '## Model details', *details, '',
        '## Results', *([f'- {r}' for r in results] or ['- not reported']), '',
        '## Usage', usage, '', '## Citation', '```bibtex', CITATION, '```', ''])


def _recorded_results(checkpoint: Checkpoint) -> List[str]:
    """The eval top-1 conformer-train stored with these weights (EMA or raw, as loaded)."""
    metrics, ema = checkpoint.meta.get('metrics') or {}, checkpoint.weights_key in EMA_KEYS
    top1 = metrics.get('ema_top1' if ema else 'top1')
    if top1 is None:
        return []
    return [f"top-1 {top1:.2f}% ({'EMA' if ema else 'raw'} weights) on the eval split, as "
            f"recorded by conformer-train at epoch {checkpoint.meta.get('epoch', '?')}"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='conformer-convert',
        description='Convert Conformer weights (paper .pth, DeiT-style or conformer-zoo '
                    'training checkpoints, mmpretrain .pth, safetensors; a file, folder, URL, '
                    'hf-hub:ORG/NAME or local-dir:FOLDER) into a Hugging Face Hub folder: '
                    'model.safetensors + config.json + README.md.')
    parser.add_argument('source', help='weights to convert')
    parser.add_argument('out_dir', help='folder to write')
    parser.add_argument('--model', help='timm model name (default: recognised from the file)')
    parser.add_argument('--no-ema', dest='use_ema', action='store_false',
                        help='take the raw weights of a checkpoint that also holds EMA weights')
    parser.add_argument('--top1', type=float, help='top-1 accuracy (%%) for the model card')
    parser.add_argument('--dataset', help='dataset the weights were trained on, for the card')
    parser.add_argument('--license', help="license of the weights (default: the variant's)")
    parser.add_argument('--repo-id', help='ORG/NAME the folder will be published as')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        convert(args.source, args.out_dir, model_name=args.model, use_ema=args.use_ema,
                top1=args.top1, dataset=args.dataset, license=args.license,
                repo_id=args.repo_id)
    except (ValueError, DownloadError) as e:  # CheckpointError is a ValueError
        parser.exit(2, f'conformer-convert: error: {e}\n')


if __name__ == '__main__':
    sys.exit(main())
