"""Weight files every loader test reads, written here from a small model's state_dict,
independently of the loader: the paper's bare state_dict, DeiT-style training checkpoints,
mmpretrain's (legacy pickle, `backbone.`/`head.` prefixes, mmcv names), conformer-zoo training
checkpoints and safetensors. The fixtures built from them (`reference`, `layouts`,
`quickstart`) are in conftest.py.
"""
import argparse

import timm
import torch
from safetensors.torch import save_file

import conformer  # noqa: F401  registers the models and the weight loader

NANO = 'conformer_nano_patch4'


def nano(**kwargs):
    return timm.create_model(NANO, **kwargs).eval()


def perturbed(state_dict, seed=1):
    """Another set of weights of the same shapes (stands in for the EMA copy)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state_dict.items()}


def to_mmpretrain(state_dict):
    """The paper's keys as mmpretrain names them (written from mmpretrain's module names)."""
    block_names = [('.norm1.', '.ln1.'), ('.norm2.', '.ln2.'),
                   ('.mlp.fc1.', '.ffn.layers.0.0.'), ('.mlp.fc2.', '.ffn.layers.1.')]
    out = {}
    for key, value in state_dict.items():
        if key.startswith(('conv_cls_head.', 'trans_cls_head.')):
            out['head.' + key] = value
            continue
        if key.startswith('trans_1.') or '.trans_block.' in key:
            for paper, mm in block_names:
                key = key.replace(paper, mm)
        out['backbone.' + key] = value
    return out


def write_layouts(model, folder):
    """Every supported layout of `model`'s weights -> (path, the weights a loader must pick)."""
    raw = model.state_dict()
    ema = perturbed(raw)
    optimizer = {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]}
    layouts = {
        'paper': (raw, raw),
        'deit': ({'model': raw, 'model_ema': ema, 'optimizer': optimizer,
                  'lr_scheduler': {'last_epoch': 3}, 'epoch': 3,
                  'args': argparse.Namespace(model='Conformer_nano_patch4', lr=1e-3)}, ema),
        'deit_without_ema': ({'model': raw, 'optimizer': optimizer, 'epoch': 3}, raw),
        # as conformer-train (conformer/engine/trainer.py) writes them
        'ours': ({'model': raw, 'ema': ema, 'optimizer': optimizer, 'step': 30, 'epoch': 3,
                  'meta': {'variant': NANO, 'num_classes': 1000, 'in_chans': 3,
                           'classes': [str(i) for i in range(1000)], 'model_kwargs': {},
                           'epoch': 3, 'metrics': {'top1': 10.0, 'ema_top1': 12.5}},
                  'rng': [{'torch': torch.get_rng_state()}],
                  'config': {'model': {'name': NANO}}}, ema),
        'ours_without_ema': ({'model': raw, 'epoch': 3, 'meta': {'variant': NANO}}, raw),
        'ddp': ({'model': {'module.' + k: v for k, v in raw.items()}}, raw),
    }
    paths = {}
    for name, (obj, expected) in layouts.items():
        paths[name] = (folder / f'{name}.pth', expected)
        torch.save(obj, paths[name][0])
    # mmpretrain publishes legacy (non-zip) pickles
    paths['mmpretrain'] = (folder / 'mmpretrain.pth', raw)
    torch.save({'meta': {'mmcls_version': '0.18.0', 'CLASSES': ['a', 'b']},
                'state_dict': to_mmpretrain(raw)}, paths['mmpretrain'][0],
               _use_new_zipfile_serialization=False)
    paths['safetensors'] = (folder / 'model.safetensors', raw)
    save_file({k: v.contiguous() for k, v in raw.items()}, paths['safetensors'][0])
    return paths


def by_hand(state_dict, **kwargs):
    model = nano(**kwargs)
    model.load_state_dict(state_dict)
    return model


QUICKSTART = dict(stem_type='pooled', patch_size=8, channel_ratio=2, mlp_ratio=2.0)
CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
           'Bag', 'Ankle boot']
