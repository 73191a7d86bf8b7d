"""Pretrained weights: every file layout users hold loads through timm's calls, exactly.

The layouts are written by tests/helpers/weight_files.py from a small model's state_dict,
independently of the loader.
"""
import inspect
import logging
import os
import struct
import zipfile

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import conformer  # noqa: F401  registers the models and the weight loader
from conformer.models.conformer import checkpoint_filter_fn
from conformer.weights import (
    CheckpointError,
    find_weights_file,
    load_weights,
    model_from_weights,
    read_checkpoint,
)

from helpers.weight_files import CLASSES, NANO, by_hand, nano, to_mmpretrain


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


LAYOUTS = ['paper', 'deit', 'deit_without_ema', 'ours', 'ours_without_ema', 'ddp',
           'mmpretrain', 'safetensors']


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_layout_loads_through_timm_exactly(layout, layouts, images):
    path, expected = layouts[layout]
    model = timm.create_model(NANO, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(model(images), by_hand(expected)(images))


def test_ema_preferred_and_logged_raw_weights_on_request(layouts, reference, caplog):
    path, ema = layouts['ours']
    with caplog.at_level(logging.INFO):
        checkpoint = read_checkpoint(path)
    assert checkpoint.weights_key == 'ema'
    assert "using the EMA weights 'ema'" in caplog.text and "['model']" in caplog.text
    assert checkpoint.architecture == NANO and checkpoint.meta['metrics']['ema_top1'] == 12.5
    model = nano()
    assert load_weights(model, path, use_ema=False).weights_key == 'model'
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_mmpretrain_layout_of_tiny_maps_every_key():
    """The real tiny variant, in mmpretrain's layout, converts with nothing missing or left over."""
    model = timm.create_model('conformer_tiny_patch16')
    own = model.state_dict()
    mm = to_mmpretrain(own)
    # the reference layout really uses mmpretrain's names
    assert {'backbone.trans_1.ln1.weight', 'backbone.trans_1.ffn.layers.0.0.weight',
            'backbone.conv_trans_12.trans_block.ffn.layers.1.bias',
            'backbone.conv_trans_12.trans_block.attn.qkv.weight',
            'backbone.conv_trans_12.squeeze_block.conv_project.weight',
            'backbone.conv_trans_12.fusion_block.residual_conv.weight',
            'head.conv_cls_head.weight', 'head.trans_cls_head.bias'} <= mm.keys()
    converted = checkpoint_filter_fn(mm, model)
    assert converted.keys() == own.keys()
    assert all(converted[k] is own[k] for k in own)


def test_other_num_classes_keeps_backbone_and_says_so(layouts, reference, images, caplog):
    path, raw = layouts['paper']
    with caplog.at_level(logging.INFO):
        model = timm.create_model(NANO, pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    lines = [r.message for r in caplog.records if 'heads' in r.message]
    assert len(lines) == 1 and '1000 classes' in lines[0] and 'model 10' in lines[0]
    loaded = model.state_dict()
    assert loaded['conv_cls_head.weight'].shape == (10, 128)
    assert all(torch.equal(loaded[k], v) for k, v in raw.items() if 'cls_head' not in k)

    features = timm.create_model(NANO, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert not any('cls_head' in k for k in features.state_dict())
    with torch.no_grad():
        for got, want in zip(features.forward_features(images),
                             reference.forward_features(images)):
            assert torch.equal(got, want)


def test_checkpoint_with_its_own_class_count_keeps_its_heads(tmp_path, images):
    """A 10-class training checkpoint loads whole into a 10-class model (timm's own loader
    would drop the heads because the variant's cfg says 1000 classes)."""
    trained = nano(num_classes=10)
    torch.save({'model': trained.state_dict(), 'epoch': 1}, tmp_path / 'ckpt.pth')
    model = timm.create_model(NANO, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'ckpt.pth'))).eval()
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


@pytest.mark.parametrize('in_chans', [1, 4])
def test_stem_adapted_to_in_chans(in_chans, layouts, caplog):
    path, raw = layouts['paper']
    with caplog.at_level(logging.INFO):
        model = timm.create_model(NANO, pretrained=True, in_chans=in_chans,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    w = raw['conv1.weight']
    expected = (w.sum(1, keepdim=True) if in_chans == 1  # grey = sum of RGB filters
                else torch.cat([w, w[:, :1]], 1) * 3 / 4)  # RGB repeated, scaled to keep the sum
    torch.testing.assert_close(model.conv1.weight.data, expected)
    lines = [r.message for r in caplog.records if 'stem' in r.message]
    assert lines == [f'Adapted the pretrained stem conv1 from 3 to {in_chans} input channels']


def test_weights_of_another_variant_list_the_mismatched_shapes(layouts):
    path, _ = layouts['paper']
    with pytest.raises(CheckpointError) as e:
        timm.create_model(NANO, embed_dim=64, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    msg = str(e.value)
    assert str(path) in msg and 'another Conformer variant' in msg
    # the setting that differs comes first, named as the config and the tools name it
    assert msg.startswith(f'{path}: the weights are for another Conformer variant; the model '
                          f'has embed_dim=64 (the weights have 128). Set these to the weights')
    assert 'cls_token: file (1, 1, 128), model (1, 1, 64)' in msg
    assert 'file:  stem_type=small with patch_size=4 or pooled with patch_size=8, ' \
           'base_channel=32, channel_ratio=1, embed_dim=128, depth=6' in msg
    assert 'model: stem_type=small, patch_size=4, base_channel=32, channel_ratio=1, ' \
           'embed_dim=64, depth=6' in msg


def test_mismatch_describes_the_files_own_stem_and_heads(tmp_path):
    """A pooled-stem, grey, 10-class run (conformer-train's quickstart) loaded into the plain
    variant: the filter adapts the stem to 3 channels and the error must not describe that."""
    trained = nano(stem_type='pooled', patch_size=8, channel_ratio=2, in_chans=1, num_classes=10)
    torch.save({'model': {'module.' + k: v for k, v in trained.state_dict().items()}},
               tmp_path / 'best.pth')
    with pytest.raises(CheckpointError) as e:
        timm.create_model(NANO, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'best.pth')))
    assert 'file:  stem_type=small with patch_size=4 or pooled with patch_size=8, ' \
           'base_channel=32, channel_ratio=2, embed_dim=128, depth=6, in_chans=1, ' \
           'num_classes=10\n' in str(e.value)
    assert 'model: stem_type=small, patch_size=4, base_channel=32, channel_ratio=1, ' \
           'embed_dim=128, depth=6, in_chans=3, num_classes=1000\n' in str(e.value)


def test_file_without_conformer_weights(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'fc.weight': torch.zeros(2, 2), 'layer1.0.conv1.weight': torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match='holds no Conformer weights'):
        load_weights(nano(), path)


def _truncate(src, dst, keep=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


def _damage_pickle(src, dst):
    """`src` rewritten entry by entry with three bytes of its pickle zeroed: every CRC-32 is
    right, so only unpickling finds the damage."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, 'w') as new:
        for entry in old.infolist():
            data = old.read(entry)
            if entry.filename.endswith('/data.pkl'):
                data = data[:1000] + bytes(3) + data[1003:]
            new.writestr(entry.filename, data)
    return dst


def _rot_a_tensor(src, dst):
    """`src` with one byte of a tensor's stored data flipped in place."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        entry = max(archive.infolist(), key=lambda e: e.file_size)  # a weight tensor
    name_len, extra_len = struct.unpack('<HH', data[entry.header_offset + 26:
                                                    entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + 5] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize('case, problem', [
    ('zip', 'truncated PyTorch checkpoint'),
    ('zip_pickle', 'corrupt or truncated PyTorch checkpoint'),
    ('zip_bitrot', "damaged PyTorch checkpoint (Bad CRC-32 for file 'paper/data/"),
    ('legacy', 'corrupt or truncated PyTorch checkpoint'),
    ('safetensors', 'truncated safetensors file'),
    ('safetensors_body', 'corrupt safetensors file'),
    ('html', 'looks like a web page'),
    ('empty', 'the file is empty'),
])
def test_damaged_files_name_the_file_and_the_problem(case, problem, layouts, tmp_path):
    bad = tmp_path / f'{case}.bin'
    if case == 'zip':
        _truncate(layouts['paper'][0], bad)
    elif case == 'zip_pickle':
        _damage_pickle(layouts['paper'][0], bad)
    elif case == 'zip_bitrot':
        _rot_a_tensor(layouts['paper'][0], bad)
    elif case == 'legacy':
        _truncate(layouts['mmpretrain'][0], bad)
    elif case == 'safetensors':
        _truncate(layouts['safetensors'][0], bad, keep=0.001)
    elif case == 'safetensors_body':
        _truncate(layouts['safetensors'][0], bad)
    elif case == 'html':
        bad.write_bytes(b'<!DOCTYPE html><html><body>Sign in</body></html>')
    else:
        bad.write_bytes(b'')
    if case == 'safetensors':  # the header must still be readable for the check to apply
        header_len = struct.unpack('<Q', layouts['safetensors'][0].read_bytes()[:8])[0]
        assert bad.stat().st_size < header_len + 8
    with pytest.raises(CheckpointError) as e:
        timm.create_model(NANO, pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    assert str(bad) in str(e.value) and problem in str(e.value)


def test_zip_written_without_checksums_still_loads(reference, tmp_path):
    """torch.serialization.set_crc32_options(False) writes 0 for every CRC-32."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(reference.state_dict(), tmp_path / 'fast.pth')
    finally:
        torch.serialization.set_crc32_options(before)
    with zipfile.ZipFile(tmp_path / 'fast.pth') as archive:
        assert {e.CRC for e in archive.infolist()} == {0}
    loaded = read_checkpoint(tmp_path / 'fast.pth').state_dict
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize('bad_value, file_format', [(float('nan'), 'torch'),
                                                    (float('-inf'), 'safetensors')])
def test_weights_holding_nan_or_inf_are_refused(bad_value, file_format, reference, tmp_path):
    """A diverged run saves NaN weights with valid checksums; they would predict 'nan%'."""
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
    state_dict['conv_trans_3.trans_block.attn.qkv.weight'][5, 7] = bad_value
    state_dict['conv_trans_4.trans_block.attn.qkv.weight'][0, 0] = bad_value
    if file_format == 'torch':
        path = tmp_path / 'last.pth'
        torch.save({'model': state_dict, 'meta': {'variant': NANO}}, path)
    else:
        path = tmp_path / 'model.safetensors'
        save_file(state_dict, path)
    with pytest.raises(CheckpointError) as e:
        timm.create_model(NANO, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(e.value).startswith(
        f"{path}: 'conv_trans_3.trans_block.attn.qkv.weight' holds NaN or infinite values "
        f"(1 of {state_dict['conv_trans_3.trans_block.attn.qkv.weight'].numel()})")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f'{tmp_path}/nope.pth: no such file'):
        timm.create_model(NANO, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.pth')))


class _RunsCode:
    def __reduce__(self):
        return os.system, ('touch pwned',)


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'model': nano().state_dict(), 'hook': _RunsCode()}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(nano(), path)
    assert 'holds pickled code (posix.system)' in str(e.value)
    assert 'was not loaded' in str(e.value)
    assert not (tmp_path / 'pwned').exists()


def test_model_folder_with_several_weight_files_is_ambiguous(tmp_path):
    for name in ('a.pth', 'b.pth'):
        (tmp_path / name).write_bytes(b'x')
    with pytest.raises(CheckpointError, match=r"found \['a.pth', 'b.pth'\]"):
        find_weights_file(tmp_path)


def test_in1k_tags_point_at_the_hash_named_mmpretrain_files():
    expected = {
        'conformer_tiny_patch16.in1k':
            'conformer-tiny-p16_3rdparty_8xb128_in1k_20211206-f6860372.pth',
        'conformer_small_patch16.in1k':
            'conformer-small-p16_3rdparty_8xb128_in1k_20211206-3065dcf5.pth',
        'conformer_small_patch32.in1k':
            'conformer-small-p32_8xb128_in1k_20211206-947a0816.pth',
        'conformer_base_patch16.in1k':
            'conformer-base-p16_3rdparty_8xb128_in1k_20211206-bfdf8637.pth',
    }
    assert sorted(timm.list_pretrained('conformer*')) == sorted(expected)
    for tag, filename in expected.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url == ('https://download.openmmlab.com/mmclassification/v0/conformer/'
                           + filename)
        assert torch.hub.HASH_REGEX.search(filename).group(1) == filename[-12:-4]
        assert cfg.num_classes == 1000 and cfg.license == 'apache-2.0'


def test_variant_without_weights_says_what_to_do():
    with pytest.raises(RuntimeError, match=r'conformer_nano_patch4 has no pretrained weights; '
                                           r'use pretrained=False'):
        timm.create_model(NANO, pretrained=True)


def test_other_timm_models_keep_timms_own_loader(tmp_path, caplog):
    source = timm.create_model('test_resnet')
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'resnet.pth')
    with caplog.at_level(logging.INFO):
        model = timm.create_model('test_resnet', pretrained=True, num_classes=7,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'resnet.pth')))
    loggers = {r.name for r in caplog.records}
    assert 'timm.models._builder' in loggers
    assert not any(name.startswith('conformer') for name in loggers)
    assert torch.equal(model.state_dict()['conv1.0.weight'], source.state_dict()['conv1.0.weight'])


def test_model_from_weights_rebuilds_the_trained_model(quickstart):
    path, trained = quickstart
    model, checkpoint = model_from_weights(path)
    assert not model.training and checkpoint.path == path and checkpoint.weights_key == 'model'
    assert (model.num_classes, model.in_chans, model.patch_size) == (10, 1, 8)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (1, 28, 28) and cfg['mean'] == (0.286,) and cfg['std'] == (0.353,)
    assert list(cfg['label_names']) == CLASSES and cfg['num_classes'] == 10
    assert 'tag' not in cfg and 'notes' not in cfg
    data_config = timm.data.resolve_data_config({}, model=model)
    assert data_config['input_size'] == (1, 28, 28) and data_config['mean'] == (0.286,)
    # nano's default cfg says bicubic and 1.0: the record's bilinear must win
    assert data_config['interpolation'] == 'bilinear' and data_config['crop_pct'] == 1.0


def test_model_from_weights_refuses_another_class_count(quickstart, tmp_path):
    """A 10-class checkpoint built as a 1000-class model would get random heads."""
    path, trained = quickstart
    with pytest.raises(CheckpointError) as e:
        model_from_weights(path, num_classes=1000)
    assert str(e.value).startswith(f'{path}: the weights were trained for 10 classes, so a '
                                   f'model with 1000 classes would predict with untrained heads')
    assert 'omit num_classes (or pass 10)' in str(e.value)
    assert model_from_weights(path, num_classes=10)[0].num_classes == 10
    features, _ = model_from_weights(path, num_classes=0)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(features(x), trained.forward_head(trained.forward_features(x),
                                                             pre_logits=True))
    assert 'label_names' not in features.pretrained_cfg

    headless = {k: v for k, v in trained.state_dict().items() if 'cls_head' not in k}
    save_file(headless, tmp_path / 'backbone.safetensors')
    with pytest.raises(CheckpointError, match='the weights have no classifier heads, so a '
                                              'model with 10 classes'):
        model_from_weights(tmp_path / 'backbone.safetensors', NANO, num_classes=10)


def test_model_from_weights_without_a_record(tmp_path):
    """Bare weights: the variant from model_name, the stem's channels from the weights, the
    input size from the variant."""
    grey = nano(in_chans=1)
    save_file(grey.state_dict(), tmp_path / 'model.safetensors')
    recognised, _ = model_from_weights(tmp_path)  # its shapes are the default nano's
    assert recognised.pretrained_cfg['architecture'] == NANO
    model, checkpoint = model_from_weights(f'local-dir:{tmp_path}', NANO)
    assert checkpoint.file_format == 'safetensors' and model.in_chans == 1
    assert model.pretrained_cfg['input_size'] == (1, *grey.pretrained_cfg['input_size'][1:])
    assert 'label_names' not in model.pretrained_cfg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in grey.state_dict().items())
    # ImageNet's RGB mean and std, averaged into one grey channel the transforms can apply
    data_config = timm.data.resolve_data_config({}, model=model)
    assert data_config['mean'] == pytest.approx((sum(IMAGENET_DEFAULT_MEAN) / 3,))
    assert data_config['std'] == pytest.approx((sum(IMAGENET_DEFAULT_STD) / 3,))
    transform = timm.data.create_transform(**data_config)
    assert transform(Image.new('L', (40, 40), 128)).shape == (1, 32, 32)


def test_the_timm_step_replaced_for_conformers_is_as_expected():
    """The loader routes through a private timm step; a timm that changed it fails here (and
    pyproject.toml keeps timm below 1.1)."""
    from timm.models import _builder

    from conformer.weights.loading import TIMM_LOADER_PARAMS
    assert getattr(_builder.load_pretrained, 'conformer_zoo', False)
    timms_own = _builder.load_pretrained.__wrapped__
    assert tuple(inspect.signature(timms_own).parameters) == TIMM_LOADER_PARAMS
    assert callable(_builder._resolve_pretrained_source)
    # build_model_with_cfg looks the step up in its module each time a model is built
    assert 'load_pretrained(' in inspect.getsource(_builder.build_model_with_cfg)


def test_a_changed_timm_step_is_left_alone_with_a_warning(monkeypatch):
    from timm.models import _builder

    from conformer.weights import install_timm_loader

    def load_pretrained(model, pretrained_cfg=None, *, device=None):
        pass

    monkeypatch.setattr(_builder, 'load_pretrained', load_pretrained)
    with pytest.warns(RuntimeWarning, match=r'timm .* changed the private loading step .*'
                                            r'pip install "timm>=1.0,<1.1"'):
        install_timm_loader()
    assert _builder.load_pretrained is load_pretrained
