"""conformer.viz: branch activation maps and both heads' CAMs, checked against the model's
own outputs, and the PNG the CLI writes."""
import pytest
import timm
import torch
from PIL import Image

import conformer  # noqa: F401
from conformer.cli.visualize import main
from conformer.viz import branch_activation_maps, class_activation_maps


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('conformer_nano_patch4', num_classes=10).eval()


def test_cnn_branch_map_is_the_channel_mean_of_the_intermediate(model):
    x = torch.randn(2, 3, 32, 40)
    maps = branch_activation_maps(model, x, block=4)  # conv_trans_4 is the second tap
    assert model.feature_info[1]['module'] == 'conv_trans_4'
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].mean(1)
    torch.testing.assert_close(maps['cnn'], want)
    assert maps['transformer'].shape == (2, 32 // 4, 40 // 4)  # the token grid


def test_cnn_cam_averages_to_the_conv_head_logit(model):
    x = torch.randn(2, 3, 32, 32)
    cams = class_activation_maps(model, x)
    with torch.no_grad():
        features = model.forward_features(x)
        conv_logits, _ = model._heads(model.forward_head(features, pre_logits=True))
        summed = model.forward_head(features)
    k = summed.argmax(-1)
    assert torch.equal(cams['class_index'], k)
    bias = model.conv_cls_head.bias[k]
    torch.testing.assert_close(cams['cnn'].mean((1, 2)) + bias,
                               conv_logits.gather(1, k[:, None])[:, 0])


def test_transformer_cam_is_the_head_applied_to_each_patch_token(model):
    x = torch.randn(1, 3, 32, 32)
    cams = class_activation_maps(model, x, class_index=3)
    with torch.no_grad():
        tokens = model.forward_features(x)[1]
        want = tokens[0, 1:] @ model.trans_cls_head.weight[3] + model.trans_cls_head.bias[3]
    torch.testing.assert_close(cams['transformer'][0].flatten(), want)


def test_bad_block_and_class_are_clear_errors(model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match='block must be one of 2..6'):
        branch_activation_maps(model, x, block=1)
    with pytest.raises(ValueError, match='class_index must be in 0..9'):
        class_activation_maps(model, x, class_index=10)


def test_cli_writes_a_png(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / 'nano.pth')
    Image.new('RGB', (50, 40), (200, 30, 30)).save(tmp_path / 'red.png')
    out = tmp_path / 'fig.png'
    assert main([str(tmp_path / 'red.png'), '--output', str(out), '--model',
                 'conformer_nano_patch4', '--checkpoint', str(tmp_path / 'nano.pth'),
                 '--num-classes', '10', '--labels', 'none']) == 0
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.width > 3 * png.height


def test_cli_reports_an_unreadable_image(model, tmp_path, capsys):
    torch.save(model.state_dict(), tmp_path / 'nano.pth')
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    with pytest.raises(SystemExit):
        main([str(tmp_path / 'bad.jpg'), '--output', str(tmp_path / 'x.png'), '--model',
              'conformer_nano_patch4', '--checkpoint', str(tmp_path / 'nano.pth'),
              '--num-classes', '10', '--labels', 'none'])
    assert 'bad.jpg' in capsys.readouterr().err


@pytest.mark.parametrize('output, message', [
    ('fig.xyz', "matplotlib cannot write '.xyz' files"),
    ('red.png', 'red.png is the input'),
])
def test_bad_output_paths_are_refused_before_the_model_runs(model, tmp_path, capsys, output,
                                                           message):
    torch.save(model.state_dict(), tmp_path / 'nano.pth')
    Image.new('RGB', (50, 40), (200, 30, 30)).save(tmp_path / 'red.png')
    with pytest.raises(SystemExit):
        main([str(tmp_path / 'red.png'), '--output', str(tmp_path / output), '--model',
              'conformer_nano_patch4', '--checkpoint', str(tmp_path / 'nano.pth'),
              '--num-classes', '10', '--labels', 'none'])
    assert message in capsys.readouterr().err
    with Image.open(tmp_path / 'red.png') as img:  # the input is untouched
        assert img.size == (50, 40) and img.getpixel((0, 0)) == (200, 30, 30)


def test_output_without_a_suffix_gets_png(model, tmp_path, capsys):
    torch.save(model.state_dict(), tmp_path / 'nano.pth')
    Image.new('RGB', (50, 40), (200, 30, 30)).save(tmp_path / 'red.png')
    assert main([str(tmp_path / 'red.png'), '--output', str(tmp_path / 'figs' / 'fig'),
                 '--model', 'conformer_nano_patch4', '--checkpoint', str(tmp_path / 'nano.pth'),
                 '--num-classes', '10', '--labels', 'none']) == 0
    assert f"wrote {tmp_path / 'figs' / 'fig.png'}" in capsys.readouterr().out
    with Image.open(tmp_path / 'figs' / 'fig.png') as png:
        assert png.format == 'PNG'


def test_a_grayscale_checkpoint_is_shown_in_gray(tmp_path, capsys):
    """A 1-channel model (Fashion-MNIST) reads the image as grayscale, and its class names
    come from the checkpoint's record."""
    torch.manual_seed(0)
    gray = timm.create_model('conformer_nano_patch4', in_chans=1, num_classes=2).eval()
    meta = dict(variant='conformer_nano_patch4', classes=['shirt', 'shoe'], input_size=32,
                mean=[0.3], std=[0.35])
    torch.save(dict(model=gray.state_dict(), meta=meta), tmp_path / 'gray.pth')
    Image.new('RGB', (50, 40), (200, 30, 30)).save(tmp_path / 'red.png')
    assert main([str(tmp_path / 'red.png'), '--output', str(tmp_path / 'fig.png'),
                 '--checkpoint', str(tmp_path / 'gray.pth'), '--class-index', '1']) == 0
    assert '(class: shoe)' in capsys.readouterr().out
    with Image.open(tmp_path / 'fig.png') as png:
        assert png.format == 'PNG'
