"""The command-line tools as a whole: no output flag may replace one of the tool's inputs (by
any path to the same file), and conformer-export names the [export] extra before any work."""
import os
import re
import sys

import pytest
import timm
import torch
from PIL import Image

import conformer  # noqa: F401
from conformer.cli import convert, export, predict, visualize
from conformer.cli.export import missing_onnx_packages

NANO = ['--model', 'conformer_nano_patch4', '--num-classes', '10']


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """A nano checkpoint, a labels file, an image folder and links to them; tools would
    refuse nothing but the output path, which is checked before the model is read."""
    tmp = tmp_path_factory.mktemp('inputs')
    torch.manual_seed(0)
    torch.save(timm.create_model('conformer_nano_patch4', num_classes=10).state_dict(),
               tmp / 'nano.pth')
    os.link(tmp / 'nano.pth', tmp / 'nano.pt2')  # a hard link: the same file
    (tmp / 'labels.txt').write_text('\n'.join(f'class_{i}' for i in range(10)))
    (tmp / 'images').mkdir()
    Image.new('RGB', (40, 36), (250, 10, 10)).save(tmp / 'images' / 'a.png')
    Image.new('RGB', (40, 36), (10, 10, 250)).save(tmp / 'b.png')
    os.symlink(tmp / 'b.png', tmp / 'link.png')
    os.symlink(tmp / 'nano.pth', tmp / 'link.pth')
    (tmp / 'hub').mkdir()  # a converted model folder
    for name in ('model.safetensors', 'config.json', 'README.md'):
        (tmp / 'hub' / name).write_text(f'the source {name}')
    return tmp


PREDICT = [predict.main, '{t}/b.png', *NANO, '--checkpoint', '{t}/nano.pth']
VISUALIZE = [visualize.main, '{t}/b.png', *NANO, '--checkpoint', '{t}/nano.pth']


@pytest.mark.parametrize('command, output, input', [
    # tool and arguments | the output that is an input | that input, as the tool was given it
    (PREDICT + ['--json'], '{t}/b.png', '{t}/b.png'),
    (PREDICT + ['--json'], '{t}/link.png', '{t}/b.png'),  # a symlink to the input
    (PREDICT[:1] + ['{t}/images'] + PREDICT[2:] + ['--json'], '{t}/images/a.png',
     '{t}/images/a.png'),  # an image found in an input folder
    (PREDICT + ['--json'], '{t}/nano.pth', '{t}/nano.pth'),
    (PREDICT + ['--json'], '{t}/link.pth', '{t}/nano.pth'),
    (PREDICT + ['--labels', '{t}/labels.txt', '--json'], '{t}/labels.txt', '{t}/labels.txt'),
    (VISUALIZE + ['--output'], '{t}/b.png', '{t}/b.png'),
    (VISUALIZE + ['--output'], '{t}/link.png', '{t}/b.png'),
    ([export.main, *NANO, '--format', 'pt2', '--checkpoint', '{t}/nano.pt2', '--output'],
     '{t}/nano.pt2', '{t}/nano.pt2'),
    ([export.main, *NANO, '--format', 'pt2', '--checkpoint', '{t}/nano.pt2', '--output'],
     '{t}/nano', '{t}/nano.pt2'),  # .pt2 appended, and a hard link to the checkpoint
    ([export.main, *NANO, '--format', 'pt2', '--checkpoint', '{t}/nano.pth', '--output'],
     '{t}/nano.pt2', '{t}/nano.pth'),
    ([convert.main, '{t}/hub/model.safetensors', '--overwrite'], '{t}/hub',
     '{t}/hub/model.safetensors'),
    ([convert.main, 'local-dir:{t}/hub', '--overwrite'], '{t}/hub', '{t}/hub'),
])
def test_no_tool_writes_over_its_input(command, output, input, inputs, capsys):
    main, *args = [a.format(t=inputs) if isinstance(a, str) else a for a in command]
    output, input = output.format(t=inputs), input.format(t=inputs)
    before = {p: p.read_bytes() for p in inputs.rglob('*') if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main([*args, output])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'Traceback' not in err
    assert re.search(rf'{re.escape(output)}\S* is .*input.* {re.escape(input)}', err), err
    after = {p: p.read_bytes() for p in inputs.rglob('*') if p.is_file()}
    assert after == before  # nothing written, nothing replaced


def test_an_output_beside_the_inputs_is_fine(inputs, tmp_path):
    """The check refuses inputs only: a new file in an input folder is written."""
    out = inputs / 'images' / 'results.json'
    assert predict.main([str(inputs / 'images'), *NANO, '--checkpoint',
                         str(inputs / 'nano.pth'), '--json', str(out)]) == 0
    assert 'a.png' in out.read_text()
    out.unlink()


def test_export_names_the_missing_extra_before_any_work(monkeypatch, tmp_path, capsys):
    assert missing_onnx_packages() == []
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # import now raises ImportError
    assert missing_onnx_packages() == ['onnxscript']
    with pytest.raises(SystemExit) as exit_info:
        export.main([*NANO, '--output', str(tmp_path / 'nano')])  # --format both
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'Traceback' not in err
    assert 'missing: onnxscript' in err and '--format pt2' in err
    assert 'pip install "conformer-zoo[export]"' in err  # a pip install
    assert 'pip install -e ".[export]"' in err  # a source checkout's editable install
    assert not list(tmp_path.iterdir())  # not even the .pt2
