"""Turn Conformer weights in any supported format into a folder ready for the Hugging Face Hub.

The folder holds ``model.safetensors`` (the paper's key names), timm's ``config.json`` (so
``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` or ``'local-dir:FOLDER'`` rebuilds
the model) and ``README.md``, a model card with the source file and its sha256, results and
license. Publish it with ``hf upload ORG/NAME FOLDER``. Command line: ``conformer-convert``
(:mod:`conformer.cli.convert`).

The model is rebuilt as it was trained by `rebuild.model_from_weights`: the variant from
``--model``, else recognised from the file (a hosted ``.in1k`` release by name, the model name
a training run recorded, a converted folder's ``config.json``, a variant name inside the file
name such as the paper's ``Conformer_small_patch16.pth``); num_classes and in_chans from the
weights; architecture overrides, class names, input size, mean and std from conformer-train's
``meta`` or the ``config.json``. The card also takes the eval top-1 recorded with the weights.
A folder already holding any of the three files is refused unless ``--overwrite`` is given; a
conversion that fails part-way (a full disk) leaves the folder as it was.
"""
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from timm.models import get_pretrained_cfg, save_for_hf

from .download import sha256_file
from .reader import EMA_KEYS, Checkpoint
from .rebuild import model_from_weights

__all__ = ['OUT_FILES', 'convert', 'model_card']

_logger = logging.getLogger(__name__)

OUT_FILES = ('model.safetensors', 'config.json', 'README.md')

PAPER = ('Conformer: Local Features Coupling Global Representations for Visual Recognition '
         '(Peng et al., ICCV 2021, arXiv:2105.03889)')
CITATION = """@inproceedings{peng2021conformer,
  title={Conformer: Local Features Coupling Global Representations for Visual Recognition},
  author={Peng, Zhiliang and Huang, Wei and Gu, Shanzhi and Xie, Lingxi and Wang, Yaowei and
          Jiao, Jianbin and Ye, Qixiang},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2021}
}"""


def convert(source: Union[str, Path], out_dir: Union[str, Path], model_name: Optional[str] = None,
            use_ema: bool = True, top1: Optional[float] = None, dataset: Optional[str] = None,
            license: Optional[str] = None, repo_id: Optional[str] = None,
            cache_dir: Optional[Union[str, Path]] = None, overwrite: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None) -> Path:
    """Write `out_dir` (model.safetensors, config.json, README.md) from the weights at `source`
    and return it.

    Args:
        source: a file, folder, URL, ``hf-hub:`` or ``local-dir:`` name.
        out_dir: the folder to write; created if missing.
        model_name: the variant; None recognises it from the weights (see
            `model_from_weights`).
        use_ema: take the EMA weights when the file holds both.
        top1: an eval top-1 (%) to report in the model card.
        dataset: the dataset that top-1 is on; None means imagenet-1k for a hosted release,
            else unnamed.
        license: the license for the card and config; None keeps the variant's.
        repo_id: the Hub repo the card's usage names; None means ``ORG/<out_dir's name>``.
        cache_dir: where downloads are kept.
        overwrite: replace files of those names already in `out_dir` (else refused).
        model_kwargs: architecture settings the weights were trained with, over what they
            record (see `model_from_weights`).

    Raises:
        ValueError: `out_dir` cannot be written or would lose files.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model, checkpoint = model_from_weights(source, model_name, use_ema=use_ema,
                                           cache_dir=cache_dir, model_kwargs=model_kwargs)
    cfg = model.pretrained_cfg
    release = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get('tag') else None
    if license:
        cfg['license'] = license
    card = model_card(model, checkpoint, release, top1=top1, dataset=dataset,
                      repo_id=repo_id or f'ORG/{out_dir.resolve().name}')
    # written beside, then moved in: a write that fails (a full disk) leaves no partial file
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix='.conformer-convert-'))
    try:
        save_for_hf(model, staging, safe_serialization=True,
                    model_config=dict(label_names=cfg['label_names']) if 'label_names' in cfg
                    else None)
        (staging / 'README.md').write_text(card, encoding='utf-8')
        for name in OUT_FILES:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _logger.info(f'Wrote {out_dir}/ ({", ".join(OUT_FILES)}); publish with: '
                 f'hf upload {repo_id or "ORG/NAME"} {out_dir}')
    return out_dir


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a folder that cannot be written or whose files would be lost."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'{out_dir} exists and is not a folder; name a folder to write')
    existing = [name for name in OUT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise ValueError(f'{out_dir} already holds {", ".join(existing)}; pass --overwrite '
                         f'(overwrite=True) to replace them, or name another folder')
    nearest = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise ValueError(f'cannot create {out_dir}: {nearest} is a file; name another folder')
    try:  # os.access cannot tell (root, read-only or virtual file systems): try it
        tempfile.TemporaryDirectory(dir=nearest, prefix='.conformer-convert-').cleanup()
    except OSError as e:
        raise ValueError(f'cannot write to {out_dir} ({e.strerror}: {nearest}); name a folder '
                         f'you can write to') from e


def model_card(model: torch.nn.Module, checkpoint: Checkpoint, release: Optional[str],
               top1: Optional[float] = None, dataset: Optional[str] = None,
               repo_id: str = 'ORG/NAME') -> str:
    """A Hub model card: front matter, details with the source's sha256, results, usage.

    Args:
        model: the model as rebuilt by `model_from_weights`.
        checkpoint: what was read from the source file.
        release: the hosted pretrained tag the weights are, or None.
        top1: an eval top-1 (%) to report.
        dataset: the dataset that top-1 is on; None means imagenet-1k for a release.
        repo_id: the Hub repo the usage example loads.
    """
    cfg = model.pretrained_cfg
    dataset = dataset or ('imagenet-1k' if release else None)
    results: List[str] = list(cfg.get('notes') or ()) if release else []
    results += _recorded_results(checkpoint)
    if top1 is not None:
        results.append(f'top-1 {top1:.2f}%' + (f' on {dataset}' if dataset else ''))
    weights_from = (f'the {checkpoint.weights_key!r} entry' if checkpoint.weights_key
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
