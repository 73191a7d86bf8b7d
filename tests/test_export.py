"""conformer.export: ONNX (run in onnxruntime) and torch.export programs with dynamic batch
and image size, traced at one size and run at others."""
import sys

import pytest
import torch

import timm
import conformer  # noqa: F401
from conformer.export import check_onnx, export_onnx, main


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


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (3, 3, 48, 64), (2, 3, 40, 24)])
def test_onnx_runs_at_other_batch_and_image_sizes(exported, shape):
    _, model, out = exported
    assert check_onnx(str(out / 'nano.onnx'), model, torch.randn(shape)) < 1e-4


@pytest.mark.parametrize('shape', [(1, 3, 32, 32), (3, 3, 48, 64), (2, 3, 40, 24)])
def test_torch_export_program_runs_at_other_batch_and_image_sizes(exported, shape):
    _, model, out = exported
    program = torch.export.load(out / 'nano.pt2')
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # import now raises ImportError
    model = timm.create_model('conformer_nano_patch4', num_classes=10)
    with pytest.raises(ImportError, match=r'conformer-zoo\[export\]'):
        export_onnx(model, str(tmp_path / 'x.onnx'), (32, 32))


@pytest.mark.parametrize('model, weights, message', [
    ('conformer_nano_patch4', ['--checkpoint', 'no.pth'], 'does not exist'),
    ('conformer_nano', ['--pretrained'], "unknown model 'conformer_nano'; choose one of"),
])
def test_missing_checkpoint_or_unknown_model_is_a_clear_cli_error(model, weights, message,
                                                                   tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--model', model, *weights, '--output', str(tmp_path / 'x')])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
