"""conformer-convert: every input layout -> a Hub folder that timm loads back exactly."""
import errno
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import conformer  # noqa: F401
from conformer.cli.convert import main
from conformer.weights import known_release, sha256_file
from conformer.weights.convert import convert

from helpers.weight_files import CLASSES, NANO, QUICKSTART, by_hand, nano, to_mmpretrain


def assert_same_model(model, expected, x):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    with torch.no_grad():
        assert torch.equal(model.eval()(x), by_hand(expected)(x))


@pytest.mark.parametrize('layout', ['paper', 'deit', 'ours', 'ddp', 'mmpretrain', 'safetensors'])
def test_round_trip_through_local_dir(layout, layouts, tmp_path):
    path, expected = layouts[layout]
    # DeiT-style and conformer-zoo checkpoints record their variant; the others need --model
    model_name = None if layout in ('deit', 'ours') else NANO
    out = convert(path, tmp_path / 'out', model_name=model_name)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json',
                                                     'model.safetensors']
    assert load_file(out / 'model.safetensors').keys() == expected.keys()
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert_same_model(model, expected, torch.randn(2, 3, 32, 32))

    again = convert(f'local-dir:{out}', tmp_path / 'again')  # config.json names the variant
    first, second = load_file(out / 'model.safetensors'), load_file(again / 'model.safetensors')
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_checkpoint_keeps_its_classes_and_channels(tmp_path):
    trained = nano(num_classes=10, in_chans=1, mlp_ratio=2.0)
    ema = {k: v + 1e-3 if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    classes = ['T-shirt', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot']
    meta = {'variant': NANO, 'num_classes': 10, 'in_chans': 1, 'classes': classes,
            'model_kwargs': {'mlp_ratio': 2.0}, 'input_size': 28, 'mean': [0.286],
            'std': [0.353], 'epoch': 9, 'metrics': {'top1': 92.8, 'ema_top1': 93.1}}
    torch.save({'model': trained.state_dict(), 'ema': ema, 'epoch': 9, 'meta': meta},
               tmp_path / 'last.pth')
    out = convert(tmp_path / 'last.pth', tmp_path / 'out', top1=91.5, dataset='fashion-mnist',
                  repo_id='me/conformer-nano-fmnist')
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == NANO and config['num_classes'] == 10
    assert config['model_args'] == {'num_classes': 10, 'in_chans': 1, 'mlp_ratio': 2.0}
    assert config['label_names'] == classes
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 28, 28] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    assert 'notes' not in config['pretrained_cfg'] and 'tag' not in config['pretrained_cfg']
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.num_classes == 10 and model.in_chans == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())

    card = (out / 'README.md').read_text()
    assert 'datasets:\n- fashion-mnist' in card and 'license: apache-2.0' in card
    assert '- top-1 91.50% on fashion-mnist' in card
    assert '- top-1 93.10% (EMA weights) on the eval split, as recorded by conformer-train at ' \
           'epoch 9' in card
    assert sha256_file(tmp_path / 'last.pth') in card and "weights from the 'ema' entry" in card
    assert "timm.create_model('hf-hub:me/conformer-nano-fmnist', pretrained=True)" in card


def test_converted_folder_converts_again_with_its_architecture(quickstart, tmp_path):
    """config.json's model_args (a pooled stem, patch 8) rebuild the variant, not the
    registered defaults; class names and preprocessing survive the second conversion."""
    path, trained = quickstart
    first = convert(path, tmp_path / 'first')
    again = convert(f'local-dir:{first}', tmp_path / 'again')
    config = json.loads((again / 'config.json').read_text())
    assert config['model_args'] == dict(QUICKSTART, in_chans=1, num_classes=10)
    assert config['label_names'] == CLASSES
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 28, 28] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    model = timm.create_model(f'local-dir:{again}', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_existing_files_are_kept_unless_overwrite(layouts, tmp_path, capsys):
    path, expected = layouts['ours']
    repo = tmp_path / 'repo'
    repo.mkdir()
    (repo / 'README.md').write_text('# my project\n')
    (repo / 'config.json').write_text('{}')
    (repo / 'train.py').write_text('')
    with pytest.raises(SystemExit) as e:
        main([str(path), str(repo)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert err == (f'conformer-convert: error: {repo} already holds config.json, README.md; '
                   f'pass --overwrite (overwrite=True) to replace them, or name another folder\n')
    assert (repo / 'README.md').read_text() == '# my project\n'
    assert not (repo / 'model.safetensors').exists()

    main([str(path), str(repo), '--overwrite'])
    assert (repo / 'README.md').read_text().startswith('---\ntags:')
    assert load_file(repo / 'model.safetensors').keys() == expected.keys()
    assert (repo / 'train.py').exists()


def test_a_conversion_cut_short_leaves_no_partial_files(layouts, tmp_path, monkeypatch):
    """A full disk part-way through: no half-written model.safetensors that a second attempt
    would then refuse to replace."""
    path, expected = layouts['ours']
    out = tmp_path / 'repo'

    def disk_full(model, folder, **kwargs):
        (Path(folder) / 'model.safetensors').write_bytes(b'\0' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr('conformer.weights.convert.save_for_hf', disk_full)
    with pytest.raises(OSError, match='No space left'):
        convert(path, out)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    convert(path, out)
    assert load_file(out / 'model.safetensors').keys() == expected.keys()
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json',
                                                     'model.safetensors']


@pytest.mark.parametrize('case', ['file', 'under_a_file', 'not_writable'])
def test_unusable_out_dir_is_a_usage_error_before_any_work(case, tmp_path, capsys):
    (tmp_path / 'afile').write_text('')
    out_dir = {'file': tmp_path / 'afile', 'under_a_file': tmp_path / 'afile' / 'out',
               'not_writable': Path('/sys/conformer-convert-test')}[case]
    if case == 'not_writable' and not Path('/sys').is_dir():
        pytest.skip('needs Linux /sys, where nobody (not even root) can create a folder')
    with pytest.raises(SystemExit) as e:  # the weights do not exist: never read
        main([str(tmp_path / 'missing.pth'), str(out_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert err.startswith('conformer-convert: error: ') and 'missing.pth' not in err
    assert {'file': f'{out_dir} exists and is not a folder',
            'under_a_file': f'cannot create {out_dir}: {tmp_path / "afile"} is a file',
            'not_writable': f'cannot write to {out_dir} (',  # errno text varies
            }[case] in err


def test_no_ema_takes_the_raw_weights(layouts, tmp_path):
    path, _ = layouts['ours']
    raw, _ = layouts['paper']
    out = convert(path, tmp_path / 'out', use_ema=False)
    converted = load_file(out / 'model.safetensors')
    assert all(torch.equal(converted[k], v) for k, v in torch.load(raw).items())


def test_cli_errors_are_one_line_not_tracebacks(layouts, tmp_path, capsys):
    path = tmp_path / 'custom.pth'  # bare weights of no variant's default architecture
    torch.save(nano(embed_dim=64).state_dict(), path)
    with pytest.raises(SystemExit) as e:
        main([str(path), str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err
    assert err.startswith('conformer-convert: error: ') and '--model NAME --model-args' in err
    assert 'embed_dim=64' in err
    with pytest.raises(SystemExit):
        main([str(path), str(tmp_path / 'out'), '--model', 'resnet50'])
    assert "unknown model 'resnet50'" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_cli_converts(layouts, tmp_path):
    path, expected = layouts['mmpretrain']
    main([str(path), str(tmp_path / 'out'), '--model', NANO, '--license', 'cc-by-4.0'])
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())[
        'pretrained_cfg']['license'] == 'cc-by-4.0'
    converted = load_file(tmp_path / 'out' / 'model.safetensors')
    assert all(torch.equal(converted[k], v) for k, v in expected.items())


def test_hosted_file_names_are_recognised():
    assert known_release('conformer-small-p32_8xb128_in1k_20211206-947a0816.pth') == \
        'conformer_small_patch32.in1k'
    assert known_release('conformer-base-p16_3rdparty_8xb128_in1k_20211206-bfdf8637.pth') == \
        'conformer_base_patch16.in1k'
    assert known_release('Conformer_base_patch16.pth') is None


@pytest.mark.slow
def test_hosted_tiny_release_converts_with_its_published_results(tmp_path):
    """The tiny release's layout under its real name: recognised, card carries mmpretrain's
    top-1 and the source URL, and timm loads the folder back exactly."""
    model = timm.create_model('conformer_tiny_patch16')
    name = 'conformer-tiny-p16_3rdparty_8xb128_in1k_20211206-f6860372.pth'
    torch.save({'meta': {}, 'state_dict': to_mmpretrain(model.state_dict())}, tmp_path / name,
               _use_new_zipfile_serialization=False)
    out = convert(tmp_path / name, tmp_path / 'out')
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'conformer_tiny_patch16'
    assert config['pretrained_cfg']['notes'] == ['ImageNet-1k top-1 81.31 (mmpretrain); paper 81.3']
    card = (out / 'README.md').read_text()
    assert '- ImageNet-1k top-1 81.31 (mmpretrain); paper 81.3' in card
    assert 'https://download.openmmlab.com/mmclassification/v0/conformer/' + name in card
    assert 'datasets:\n- imagenet-1k' in card
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
