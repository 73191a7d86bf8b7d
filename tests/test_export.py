"""conformer.export: ONNX (run in onnxruntime) and torch.export programs with dynamic batch
and image size, traced at one size and run at others."""
import sys

import pytest
import timm
import torch

import conformer  # noqa: F401
from conformer.cli.export import main
from conformer.export import check_onnx, export_onnx


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """The CLI run once on a nano checkpoint: traced at 32x32, batch 2."""
    tmp = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=10).eval()
    torch.save(model.state_dict(), tmp / 'nano.pth')
    rc = main(['--model', 'conformer_nano_patch4', '--checkpoint', str(tmp / 'nano.pth'),
               '--num-classes', '10', '--image-size', '32', '32', '--format', 'both',
               '--output', str(tmp / 'out' / 'nano')])
    return rc, model, tmp / 'out'


def test_cli_writes_both_formats(exported):
    rc, _, out = exported
    assert rc == 0
    assert (out / 'nano.onnx').is_file() and (out / 'nano.pt2').is_file()


# odd, non-square and uneven sizes: the CNN map is not a multiple of the token grid, so the
# pooling windows differ in length; at 114 px nearest resizing rounds like no ONNX Resize mode
OTHER_SHAPES = [(1, 3, 32, 32), (3, 3, 48, 64), (2, 3, 40, 24), (1, 3, 31, 31), (2, 3, 30, 45),
                (1, 3, 114, 57)]


@pytest.mark.parametrize('shape', OTHER_SHAPES)
def test_onnx_runs_at_other_batch_and_image_sizes(exported, shape):
    _, model, out = exported
    assert check_onnx(str(out / 'nano.onnx'), model, torch.randn(shape)) < 1e-4


@pytest.mark.parametrize('shape', OTHER_SHAPES)
def test_torch_export_program_runs_at_other_batch_and_image_sizes(exported, shape):
    _, model, out = exported
    program = torch.export.load(out / 'nano.pt2')
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope='module', params=['conformer_tiny_patch16', 'conformer_small_patch32'])
def exported_imagenet_stem(request, tmp_path_factory):
    """A narrow, shallow model of each ImageNet-stem family exported at 224x224."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, depth=6, embed_dim=32, num_heads=2,
                              base_channel=8, num_classes=5).eval()
    path = tmp_path_factory.mktemp('onnx') / f'{request.param}.onnx'
    export_onnx(model, str(path), (224, 224))
    return model, path


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (56, 56), (40, 33), (97, 130), (241, 241),
                                  (456, 456)])
def test_onnx_of_patch16_and_patch32_matches_pytorch_at_any_size(exported_imagenet_stem, size):
    model, path = exported_imagenet_stem
    assert check_onnx(str(path), model, torch.randn(2, 3, *size)) < 1e-4


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # import now raises ImportError
    model = timm.create_model('conformer_nano_patch4', num_classes=10)
    with pytest.raises(ImportError, match=r'conformer-zoo\[export\]'):
        export_onnx(model, str(tmp_path / 'x.onnx'), (32, 32))


@pytest.mark.parametrize('args, message', [
    (['--checkpoint', 'no.pth'], 'no.pth: no such file'),
    (['--model', 'conformer_nano', '--pretrained'],
     "unknown model 'conformer_nano'; choose one of"),
    (['--image-size', '0', '32'], '--image-size must be positive, got 0 32'),
    # traced at 7x7 the program would take only 5-8 px images
    (['--image-size', '7', '7', '--format', 'pt2'],
     "traced at 7x7, the exported program does not take the model's 32x32 input"),
    (['--format', 'onnx', '--opset', '99'], '--opset 99: the export writes opsets 17 to'),
    (['--format', 'onnx', '--opset', '5'], '--opset 5: the export writes opsets 17 to'),
    (['--opset', '16'], '--opset 16: the export writes opsets 17 to'),
])
def test_bad_arguments_are_clear_cli_errors_and_write_nothing(args, message, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    if '--opset' in args:  # refused before any work: building the model would fail the test
        monkeypatch.setattr('conformer.cli.export.model_from_args', None)
    with pytest.raises(SystemExit) as exit_info:
        main(['--model', 'conformer_nano_patch4', *args, '--output', 'out/x'])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob('x.*'))


def test_output_keeps_its_dots_and_a_folder_is_refused(tmp_path, capsys):
    assert main(['--model', 'conformer_nano_patch4', '--format', 'pt2',
                 '--output', str(tmp_path / 'model.v2')]) == 0
    assert (tmp_path / 'model.v2.pt2').is_file()
    assert 'exporting randomly initialised weights' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--model', 'conformer_nano_patch4', '--output', str(tmp_path)])
    assert 'is a folder; name the files' in capsys.readouterr().err
