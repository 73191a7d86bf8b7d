"""conformer.quantize: post-training static int8 (PT2E), its calibration input checks and its
check against the float model. Mechanics run on a random nano model through the uncompiled
quantized graph (the numbers the compiled one computes, within rounding; compiling takes
minutes on 2 cores); one slow test compiles."""
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import conformer  # noqa: F401
from conformer.deploy import InferenceModel, optimize_for_inference
from conformer.deploy.quantize import (
    DEFAULT_KEEP_FLOAT,
    MIN_CALIBRATION_IMAGES,
    QuantizedModel,
    calibration_images,
    check_quantized,
    format_check,
    load_int8,
    quantize_int8,
)

from helpers.image_folders import make_folder

pytest.importorskip('torchao', reason="int8 tests need the 'int8' extra (torchao)")

SIZE = 32


def make_model():
    """A nano Conformer whose BatchNorms hold statistics of real activations (fresh ones are
    the identity, which makes the CNN branch's activations grow without bound)."""
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=10).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(images(32, seed=5))
    return model.eval()


def images(n, seed=0, size=SIZE, chans=3):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def model():
    return make_model()


@pytest.fixture(scope='module')
def quantized(model):
    return quantize_int8(model, images(64), compile=False)


def test_int8_logits_follow_the_float_model(model, quantized):
    x = images(16, seed=1)
    with torch.no_grad():
        want, got = model(x), quantized(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # int8 activations and weights: a few percent of the logits' spread, not more
    assert (got - want).norm() / want.norm() < 0.1


def test_every_conv_and_linear_but_the_kept_ones_is_int8(model, quantized):
    graph = quantized.model.graph
    targets = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    layers = [n for n in graph.nodes if n.op == 'call_function' and n.target in targets]
    int8 = [n for n in layers if 'dequantize_per_channel' in str(n.args[1].target)]
    kept = sum(1 for n in model.modules() if n in {model.get_submodule(k)
                                                   for k in DEFAULT_KEEP_FLOAT})
    # the stem conv and two heads stay float (each one layer); the rest have int8 weights
    assert kept == len(DEFAULT_KEEP_FLOAT) == len(layers) - len(int8)
    assert len(int8) > 30


def test_any_batch_size_runs_and_gives_each_image_its_own_answer(quantized):
    x = images(5, seed=2)
    with torch.no_grad():
        whole = quantized(x)
        one_by_one = torch.cat([quantized(x[i:i + 1]) for i in range(5)])
    # the same int8 arithmetic; fp32 sums in another order may move a value across a rounding
    # step of the next quantize, hence a small, not a zero, tolerance
    assert (one_by_one - whole).abs().max() < 0.02 * whole.abs().max()
    assert torch.equal(one_by_one.argmax(-1), whole.argmax(-1))


def test_another_image_size_is_refused_with_the_fix(quantized):
    with pytest.raises(ValueError, match=r'calibrated and exported for images \(3, 32, 32\).*'
                                         r'resize and crop inputs to 32x32'):
        quantized(images(2, size=48))


def test_the_int8_model_refuses_autograd_and_training(quantized):
    with pytest.raises(RuntimeError, match='no gradients'):
        quantized(images(2).requires_grad_())
    with pytest.raises(RuntimeError, match='inference only'):
        quantized.train()
    with pytest.raises(NotImplementedError, match='forward only'):
        quantized.forward_features(images(2))
    assert quantized.num_classes == 10  # other attributes come from the float model


def test_optimize_for_inference_quantizes_with_calibration(model):
    loader = DataLoader(TensorDataset(images(40), torch.zeros(40, dtype=torch.long)),
                        batch_size=8)
    deployed = optimize_for_inference(model, dtype=torch.int8, calibration=loader,
                                      compile=False, keep_float=('conv1',))
    assert isinstance(deployed, QuantizedModel) and deployed.calibration_images == 40
    assert deployed.keep_float == ('conv1',)
    with pytest.raises(ValueError, match='for dtype=torch.int8'):
        optimize_for_inference(model, calibration=loader)


@pytest.mark.parametrize('calibration, message', [
    (None, 'int8 needs calibration images: pass calibration='),
    (images(MIN_CALIBRATION_IMAGES - 1), f'has {MIN_CALIBRATION_IMAGES - 1} images; give at '
                                         f'least {MIN_CALIBRATION_IMAGES}'),
    (images(40, chans=1), 'have 1 channels, the model takes 3'),
    ([images(20), images(20, size=48)], 'different sizes: .*resize and crop'),
    (torch.zeros(40, 3, SIZE, SIZE, dtype=torch.uint8), r'float tensors .*Normalize'),
    ([['not', 'images']], 'must be image tensors'),
])
def test_bad_calibration_data_is_refused_with_the_fix(model, calibration, message):
    with pytest.raises(ValueError, match=message):
        quantize_int8(model, calibration, compile=False)


def test_a_quantized_or_deployed_model_is_refused(model, quantized):
    for done in (quantized, optimize_for_inference(model)):
        with pytest.raises(ValueError, match='already deployed or quantized; pass the original'):
            quantize_int8(done, images(40), compile=False)
    with pytest.raises(ValueError, match='keep_float names no module'):
        quantize_int8(model, images(40), keep_float=('no_such_layer',), compile=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match='outside torch.inference'):
        quantize_int8(model, images(40), compile=False)


def test_calibration_reads_a_folder_with_the_eval_transform(model, tmp_path):
    root = make_folder(tmp_path, classes=3, per_class=12, size=16) / 'train'
    data = calibration_images(root, model, batch_size=8)
    x = torch.cat(data.batches)
    assert x.shape == (36, 3, SIZE, SIZE)  # resized to the model's 32 px input
    assert torch.cat(data.labels).tolist() == sorted([0, 1, 2] * 12)
    assert x.mean().abs() < 3 and x.std() > 0.1  # normalised, not raw 0..255 pixels
    limited = calibration_images(root, model, max_images=9, min_images=1)
    assert sorted(set(torch.cat(limited.labels).tolist())) == [0, 1, 2]  # spread over classes


def test_the_check_reports_agreement_accuracy_and_names_a_bad_layer(model, quantized):
    x, labels = images(40, seed=3), torch.arange(40) % 10
    check = check_quantized(model, quantized, TensorDataset(x, labels))
    with torch.no_grad():
        pf, pq = model(x).argmax(-1), quantized(x).argmax(-1)
    assert check.images == 40
    assert check.top1_agreement == pytest.approx((pf == pq).float().mean().item())
    assert check.float_accuracy == pytest.approx((pf == labels).float().mean().item())
    assert check.int8_accuracy == pytest.approx((pq == labels).float().mean().item())
    assert {e.name for e in check.layers} >= {'conv_trans_2.trans_block.mlp.fc1',
                                              'conv_trans_2.cnn_block.conv2'}
    assert not any(e.module in DEFAULT_KEEP_FLOAT for e in check.layers)
    report = format_check(check)
    assert 'top-1 agreement' in report and 'top-1 accuracy: float' in report

    # ruin one layer's int8 weights: the check must name its module and offer the fix
    graph = quantized.model
    fc1 = [n for n in graph.graph.nodes if n.target == torch.ops.aten.linear.default][2]
    weight_node = fc1.args[1].args[0]
    original = getattr(graph, weight_node.target).clone()
    try:
        getattr(graph, weight_node.target).copy_(-original)
        ruined = check_quantized(model, quantized, x)
    finally:
        getattr(graph, weight_node.target).copy_(original)
    worst = min(ruined.layers, key=lambda e: e.sqnr_db)
    assert worst.module in ruined.low
    assert 'keep_float=DEFAULT_KEEP_FLOAT + (' in format_check(ruined)
    assert worst.module in format_check(ruined)


@pytest.mark.slow
def test_compiled_int8_computes_what_the_graph_does_at_two_batch_sizes(model, quantized):
    compiled = QuantizedModel(quantized.model, model, quantized.input_shape, torch.float32,
                              quantized.keep_float, 64, compile=True)
    for batch in (1, 3):
        x = images(batch, seed=4)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), quantized(x), atol=0.05, rtol=0.05)
    assert isinstance(compiled, InferenceModel)


def test_a_saved_int8_model_loads_with_its_settings_and_answers(model, quantized, tmp_path):
    path = quantized.save(tmp_path / 'model_int8.pt2')
    loaded = load_int8(path, compile=False)
    assert (loaded.input_shape, loaded.float_dtype, loaded.keep_float,
            loaded.calibration_images) == (quantized.input_shape, quantized.float_dtype,
                                           quantized.keep_float, quantized.calibration_images)
    assert loaded.num_classes == 10 and loaded.pretrained_cfg['mean'] == \
        list(model.pretrained_cfg['mean'])
    for batch in (1, 3):  # the saved program keeps the dynamic batch
        x = images(batch, seed=6)
        with torch.no_grad():
            assert torch.equal(loaded(x), quantized(x))
    with pytest.raises(ValueError, match='resize and crop inputs to 32x32'):
        loaded(images(2, size=48))
    check = check_quantized(model, loaded, images(8, seed=7))
    assert check.layers and check.top1_agreement > 0.5
    assert not list(tmp_path.glob('.*tmp*'))  # written through a temporary file, renamed


def test_an_unreadable_or_float_file_is_refused_by_load_int8(model, quantized, tmp_path):
    from conformer.export import export_program
    with pytest.raises(FileNotFoundError, match='no such file'):
        load_int8(tmp_path / 'missing.pt2')
    good = quantized.save(tmp_path / 'model_int8.pt2').read_bytes()
    (tmp_path / 'cut.pt2').write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match='cannot be read as a torch.export program.*damaged'):
        load_int8(tmp_path / 'cut.pt2')
    program = export_program(model, (SIZE, SIZE))
    torch.export.save(program, tmp_path / 'float.pt2')
    with pytest.raises(ValueError, match='not an int8 model written by QuantizedModel.save'):
        load_int8(tmp_path / 'float.pt2')
    torch.export.save(program, tmp_path / 'tampered.pt2',
                      extra_files={'conformer_int8.json': '{"input_shape": [3, 32]'})
    with pytest.raises(ValueError, match='record of the int8 settings .* is damaged'):
        load_int8(tmp_path / 'tampered.pt2')


@pytest.mark.slow
def test_a_saved_int8_model_serves_int8_kernels_in_a_new_process(model, quantized, tmp_path):
    """The file is all a server needs: a fresh process loads it and, compiled, computes what
    the saved model computes compiled (the same int8 kernels; a graph left to its float
    reference would differ by rounding steps)."""
    path = quantized.save(tmp_path / 'model_int8.pt2')
    x = images(2, seed=8)
    torch.save(x, tmp_path / 'x.pt')
    compiled = QuantizedModel(quantized.model, model, quantized.input_shape, torch.float32,
                              quantized.keep_float, 64, compile=True)
    with torch.no_grad():
        want = compiled(x)
    script = (
        "import torch\n"
        "from conformer.deploy.quantize import load_int8\n"
        f"model = load_int8({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(x), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, '-c', script], check=True, timeout=900)
    torch.testing.assert_close(torch.load(tmp_path / 'y.pt'), want, atol=1e-5, rtol=0)


def test_conformer_export_int8_writes_a_model_load_int8_serves(tmp_path, capsys):
    from conformer.cli.export import main
    make_folder(tmp_path / 'images', per_class=12)
    calibration = str(tmp_path / 'images' / 'train')
    args = ['--model', 'conformer_nano_patch4', '--num-classes', '3', '--int8', calibration]
    with pytest.raises(SystemExit):
        main([*args, '--output', str(tmp_path / 'm')])  # the default format, both
    assert '--int8 writes a torch.export program only: add --format pt2' in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, '--format', 'pt2', '--image-size', '48', '48', '--output',
              str(tmp_path / 'm')])
    assert '--image-size does not apply to --int8' in capsys.readouterr().err
    assert not list(tmp_path.glob('m.*'))
    assert main([*args, '--format', 'pt2', '--output', str(tmp_path / 'm')]) == 0
    out = capsys.readouterr().out
    assert 'int8, calibrated on 36 images of 3x32x32' in out and 'top-1 agreement' in out
    loaded = load_int8(tmp_path / 'm.pt2', compile=False)
    with torch.no_grad():
        assert loaded(images(2)).shape == (2, 3)
