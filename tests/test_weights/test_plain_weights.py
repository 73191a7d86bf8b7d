"""Plain weight files (a state_dict saved as safetensors or .pth, no record of the run): every
tool loads them when the model named matches, and says which setting differs when it does
not; integer, missing and unknown weights are named as such."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import conformer  # noqa: F401  registers the models and the weight loader
from conformer.cli.convert import main as convert_main
from conformer.cli.predict import main as predict_main
from conformer.weights import CheckpointError, model_from_weights
from conformer.weights.rebuild import variants_of_shape

from helpers import REPO
from helpers.image_folders import make_folder

NANO = 'conformer_nano_patch4'
CUSTOM = dict(base_channel=8, embed_dim=16, num_heads=2)


def save_plain(path, **kwargs):
    """A grey 10-class model's state_dict alone, as safetensors or torch.save writes it."""
    torch.manual_seed(0)
    model = timm.create_model(NANO, num_classes=10, in_chans=1, **kwargs).eval()
    state = model.state_dict()
    if path.suffix == '.safetensors':
        save_file(state, path)
    else:
        torch.save(state, path)
    return model


def same_weights(model, reference):
    expected = reference.state_dict()
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize('name', ['w.safetensors', 'w.pth'])
def test_a_plain_file_of_a_default_variant_is_recognised_by_its_shapes(tmp_path, name):
    reference = save_plain(tmp_path / name)
    model, _ = model_from_weights(tmp_path / name)
    assert model.pretrained_cfg['architecture'] == NANO
    assert (model.num_classes, model.in_chans) == (10, 1) and same_weights(model, reference)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_shapes_tell_the_variants_apart():
    for name in timm.list_models('conformer*'):
        with torch.device('meta'):
            state = timm.create_model(name, num_classes=7).state_dict()
        assert variants_of_shape(state) == [name]
    with torch.device('meta'):
        assert variants_of_shape(timm.create_model(NANO, **CUSTOM).state_dict()) == []


def test_a_custom_architecture_is_loaded_with_model_args_and_refused_without(tmp_path):
    path = tmp_path / 'custom.safetensors'
    reference = save_plain(path, **CUSTOM)
    with pytest.raises(CheckpointError, match="no variant's default architecture fits its "
                                              'shapes.*--model NAME --model-args'):
        model_from_weights(path)
    with pytest.raises(CheckpointError) as error:  # the variant alone: the settings named
        model_from_weights(path, NANO)
    assert 'the model has base_channel=32 (the weights have 8); embed_dim=128 (the weights ' \
           'have 16)' in str(error.value)
    model, _ = model_from_weights(path, NANO, model_kwargs=CUSTOM)
    assert same_weights(model, reference)


def test_predict_and_convert_take_model_args(tmp_path, capsys):
    path = tmp_path / 'custom.safetensors'
    reference = save_plain(path, **CUSTOM)
    image = make_folder(tmp_path / 'images', classes=1, per_class=2, size=28) / 'val' / 'class0'
    args = ['--checkpoint', str(path), '--model', NANO, '--model-args',
            'base_channel=8,embed_dim=16,num_heads=2']
    assert predict_main([*args, '--json', str(tmp_path / 'p.json'), str(image)]) == 0
    assert len(json.loads((tmp_path / 'p.json').read_text())) == 1
    with pytest.raises(SystemExit):
        predict_main([*args[:-1], 'embed_dim', str(image)])
    assert "'embed_dim' is not KEY=VALUE" in capsys.readouterr().err
    assert convert_main([str(path), str(tmp_path / 'hub'), '--model', NANO, '--model-args',
                         'base_channel=8,embed_dim=16,num_heads=2']) == 0
    model, _ = model_from_weights(tmp_path / 'hub')  # the folder records the architecture
    assert same_weights(model, reference)


@pytest.mark.parametrize('change, message', [
    ('integer', 'weights are stored as integers or booleans'),
    ('extra', "file keys unknown to the model ['extra.weight']"),
    ('missing', "model keys missing from the file ['trans_cls_head.bias']"),
])
def test_damaged_plain_files_are_named_as_such_not_as_an_unknown_variant(tmp_path, change,
                                                                         message):
    path = tmp_path / 'w.safetensors'
    save_plain(path)
    state = load_file(path)
    if change == 'integer':
        state['conv1.weight'] = state['conv1.weight'].to(torch.int8)
    elif change == 'extra':
        state['extra.weight'] = torch.zeros(2)
    else:
        del state['trans_cls_head.bias']
    save_file(state, path)
    with pytest.raises(CheckpointError, match=message.replace('[', r'\[').replace(']', r'\]')):
        model_from_weights(path)


def train(tmp_path, *args):
    images = make_folder(tmp_path / 'images', classes=10, per_class=2, size=16)
    return subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), f'model={NANO}', f'data.root={images}',
         'data.in_chans=1', 'data.input_size=16', 'data.batch_size=8', 'data.num_workers=0',
         'aug=small', 'trainer.max_steps=1', 'trainer.threads=1', 'logging.progress=false',
         'logging.plot=false', f'hydra.run.dir={tmp_path}/run', *args],
        cwd=tmp_path, text=True, capture_output=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_conformer_train_fine_tunes_from_a_plain_file_and_names_a_conflicting_setting(tmp_path):
    path = tmp_path / 'w.safetensors'
    save_plain(path)
    result = train(tmp_path, f'model.checkpoint={path}')
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.pth', map_location='cpu',
                       weights_only=True)
    assert state['meta']['variant'] == NANO and state['meta']['in_chans'] == 1
    result = train(tmp_path, f'model.checkpoint={path}', 'model.embed_dim=64',
                   f'hydra.run.dir={tmp_path}/conflict')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'the model has embed_dim=64 (the weights have 128)' in result.stderr


def test_conformer_train_fine_tunes_from_a_plain_file_of_a_custom_architecture(tmp_path):
    """No variant's default has these shapes: the configured model.* settings say what it is."""
    path = tmp_path / 'w.safetensors'
    save_plain(path, **CUSTOM)
    custom = [f'model.{key}={value}' for key, value in CUSTOM.items()]
    result = train(tmp_path, f'model.checkpoint={path}', *custom)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.pth', map_location='cpu',
                       weights_only=True)
    assert state['meta']['model_kwargs']['embed_dim'] == 16
