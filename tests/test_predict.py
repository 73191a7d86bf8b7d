"""conformer-predict: top-5 from files and folders against a direct model call, and
unreadable files reported without stopping the run."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import conformer  # noqa: F401
from conformer.cli.predict import main
from conformer.predict import load_labels, read_image

LABELS = [f'class_{i}' for i in range(10)]


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / 'nano.pth')
    (tmp_path / 'labels.txt').write_text('\n'.join(LABELS))
    images = tmp_path / 'images'
    (images / 'sub').mkdir(parents=True)
    colours = {'a.png': (250, 10, 10), 'sub/b.jpg': (10, 200, 40), 'c.bmp': (30, 30, 220)}
    for i, (name, colour) in enumerate(colours.items()):
        img = Image.new('RGB', (40 + 8 * i, 36), colour)
        img.paste((255, 255, 0), (5, 5, 20, 20))
        img.save(images / name)
    (images / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    (images / 'notes.txt').write_text('not an image, and not an image suffix: ignored')
    return model, tmp_path, images


def run(tmp_path, *inputs, batch_size=2):
    return main([*map(str, inputs), '--model', 'conformer_nano_patch4',
                 '--checkpoint', str(tmp_path / 'nano.pth'), '--num-classes', '10',
                 '--labels', str(tmp_path / 'labels.txt'), '--batch-size', str(batch_size),
                 '--json', str(tmp_path / 'out.json')])


def test_top5_matches_a_direct_model_call_and_bad_files_are_reported(setup, capsys):
    model, tmp_path, images = setup
    rc = run(tmp_path, images)
    results = json.loads((tmp_path / 'out.json').read_text())
    assert rc == 1  # one file failed; the others were still classified
    assert 'broken.jpg: cannot read' in capsys.readouterr().err
    assert [r['path'].removeprefix(str(images) + '/') for r in results] == [
        'a.png', 'broken.jpg', 'c.bmp', 'sub/b.jpg']
    transform = create_transform(**resolve_data_config(model=model))
    for r in results:
        if r['path'].endswith('broken.jpg'):
            assert 'error' in r and 'top' not in r
            continue
        with Image.open(r['path']) as img, torch.no_grad():
            probs = model(transform(img.convert('RGB'))[None]).softmax(-1)[0]
        p, i = probs.topk(5)
        assert [label for label, _ in r['top']] == [LABELS[c] for c in i]
        assert [prob for _, prob in r['top']] == pytest.approx(p.tolist(), abs=1e-5)


def test_single_files_and_exit_status(setup):
    _, tmp_path, images = setup
    assert run(tmp_path, images / 'a.png', images / 'sub' / 'b.jpg', batch_size=8) == 0
    assert len(json.loads((tmp_path / 'out.json').read_text())) == 2


def test_missing_input_is_reported_not_fatal(setup, capsys):
    _, tmp_path, images = setup
    assert run(tmp_path, images / 'a.png', tmp_path / 'missing.png') == 1
    assert 'missing.png: cannot read' in capsys.readouterr().err


def test_labels_errors_name_the_fix(tmp_path):
    imagenet, ten = (SimpleNamespace(num_classes=n, pretrained_cfg={}) for n in (1000, 10))
    assert load_labels('imagenet', imagenet)[0].startswith('tench')
    assert load_labels('auto', imagenet) == load_labels('imagenet', imagenet)
    assert load_labels('auto', ten) == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match='--labels FILE'):
        load_labels('imagenet', ten)
    (tmp_path / 'three.txt').write_text('a\nb\nc\n')
    with pytest.raises(ValueError, match='3 labels but the model has 10'):
        load_labels(str(tmp_path / 'three.txt'), ten)
    with pytest.raises(ValueError, match='is a folder; pass a text file'):
        load_labels(str(tmp_path), ten)


def test_a_training_checkpoint_brings_its_model_preprocessing_and_class_names(tmp_path, capsys):
    """conformer-train records the variant's overrides, input size, mean/std and class names:
    predict needs only --checkpoint and classifies as the eval split was."""
    torch.manual_seed(0)
    kwargs = dict(stem_type='pooled', patch_size=8, in_chans=1, num_classes=3)
    model = timm.create_model('conformer_nano_patch4', **kwargs).eval()
    meta = dict(variant='conformer_nano_patch4', classes=['cat', 'dog', 'eel'], input_size=28,
                model_kwargs=dict(stem_type='pooled', patch_size=8), mean=[0.5], std=[0.25])
    torch.save(dict(model=model.state_dict(), meta=meta), tmp_path / 'best.pth')
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'img.png')
    assert main([str(tmp_path / 'img.png'), '--checkpoint', str(tmp_path / 'best.pth'),
                 '--json', str(tmp_path / 'out.json')]) == 0
    (result,) = json.loads((tmp_path / 'out.json').read_text())
    x = (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        probs = model(x[None, None]).softmax(-1)[0]
    p, i = probs.topk(3)
    assert [label for label, _ in result['top']] == [meta['classes'][c] for c in i]
    assert [prob for _, prob in result['top']] == pytest.approx(p.tolist(), abs=1e-5)


def test_a_class_count_other_than_the_checkpoints_is_refused(setup, capsys):
    _, tmp_path, images = setup  # nano.pth has 10 classes
    with pytest.raises(SystemExit) as exit_info:
        main([str(images), '--checkpoint', str(tmp_path / 'nano.pth'),
              '--model', 'conformer_nano_patch4', '--num-classes', '1000'])
    assert exit_info.value.code == 2
    assert 'trained for 10 classes' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    ([], '--pretrained or --checkpoint'),
    (['--pretrained', '--num-classes', '0'], '--num-classes must be >= 1'),
    (['--pretrained', '--json', '/proc/conformer-zoo/out.json'], 'cannot write --json'),
])
def test_cli_errors_name_the_fix(setup, capsys, args, message):
    _, tmp_path, images = setup
    with pytest.raises(SystemExit) as exit_info:
        main([str(images), '--model', 'conformer_nano_patch4', *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_images_are_read_as_the_training_data_is(tmp_path):
    """16-bit grayscale is scaled to 8 bits (not clipped to white) and transparent pixels
    come out white (not black), in the model's channel count."""
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / 'deep.png')
    rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / 'clear.png')
    deep = read_image(tmp_path / 'deep.png', in_chans=1)
    assert deep.mode == 'L' and deep.getpixel((1, 1)) == 128
    clear = read_image(tmp_path / 'clear.png', in_chans=3)
    assert clear.mode == 'RGB'
    assert clear.getpixel((1, 1)) == (255, 255, 255) and clear.getpixel((0, 0)) == (10, 20, 30)


def test_an_oversized_image_is_reported_and_the_rest_still_run(setup, capsys, monkeypatch):
    _, tmp_path, images = setup
    Image.new('RGB', (80, 80)).save(images / 'huge.png')  # 6400 px: over 2x the limit below
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 3000)
    assert run(tmp_path, images) == 1
    results = {Path(r['path']).name: r for r in json.loads((tmp_path / 'out.json').read_text())}
    assert 'DecompressionBombError' in results['huge.png']['error']
    assert all('top' in results[name] for name in ('a.png', 'b.jpg', 'c.bmp'))
    assert 'huge.png: cannot read' in capsys.readouterr().err
