"""conformer.deploy: BatchNorm folding, the deployed model's API and its documented tolerances."""
import copy
import pickle

import pytest
import timm
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile

import conformer  # noqa: F401
from conformer.deploy import InferenceModel, fold_batchnorm, optimize_for_inference
from conformer.layers import KernelLayer

# oneDNN takes bf16 where it runs it natively and also where it emulates it on AVX-512
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
# bf16 runs (emulated, slowly) on CPUs without native bf16; that warning is tested once below
BF16_EMULATED = pytest.mark.filterwarnings('ignore:bf16 deploy on a cpu without native bf16')


def make_model(num_classes=10):
    """A nano Conformer whose BatchNorms carry non-trivial statistics and affine terms, so
    folding them is a real test (fresh BNs are the identity)."""
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_fold_batchnorm_removes_every_bn_and_keeps_outputs():
    model = make_model()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_refuses_a_training_model():
    with pytest.raises(ValueError, match='model.eval'):
        fold_batchnorm(make_model().train())


def test_fp32_deploy_matches_eager_on_every_method():
    model = make_model()
    deployed = optimize_for_inference(model)
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=0)
        for got, want in zip(deployed.forward_features(x), model.forward_features(x)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        features = model.forward_features(x)
        torch.testing.assert_close(deployed.forward_head(features, pre_logits=True),
                                   model.forward_head(features, pre_logits=True))
        got = deployed.forward_intermediates(x, intermediates_only=True)
        want = model.forward_intermediates(x, intermediates_only=True)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def onednn_ops(fn):
    """The oneDNN ops (packed convolution, inner product, the compiled linear) ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ('mkldnn::_convolution_pointwise', 'mkldnn::_linear_pointwise',
             'conformer::onednn_linear')
    return {event.key for event in prof.key_averages() if event.key in names}


@pytest.mark.parametrize('dtype, compile, onednn', [
    (torch.float32, False, {'mkldnn::_convolution_pointwise', 'mkldnn::_linear_pointwise'}),
    (torch.bfloat16, False, {'mkldnn::_convolution_pointwise', 'mkldnn::_linear_pointwise'}
     if ONEDNN_BF16 else set()),
    pytest.param(torch.float32, True, {'conformer::onednn_linear'}, marks=pytest.mark.slow),
    # inductor's freezing packs convolutions and bf16 linears itself
    pytest.param(torch.bfloat16, True, set(), marks=pytest.mark.slow)],
    ids=['fp32', 'bf16', 'fp32-compiled', 'bf16-compiled'])
@BF16_EMULATED
def test_cpu_deploy_runs_layers_through_onednn_unless_inductor_packs_them(dtype, compile,
                                                                         onednn):
    deployed = optimize_for_inference(make_model(), dtype=dtype, compile=compile)
    layers = [m for m in deployed.modules() if isinstance(m, KernelLayer)]
    assert layers and all(m.kernel_backend == 'onednn' for m in layers)
    x = torch.randn(2, 3, 32, 32)
    deployed(x)  # compiles first
    ran = onednn_ops(lambda: deployed(x))
    if compile:  # inductor's own kernels may call oneDNN on weights it packed
        ran &= {'conformer::onednn_linear'}
    assert ran == onednn
    weights = [m.weight for m in deployed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(w.dtype == dtype for w in weights)


def test_cpu_deploy_follows_new_weights_and_still_copies():
    """The packed weights are a cache beside the model: they follow load_state_dict, and
    deepcopy / pickle work after a call has packed them."""
    model, other = make_model(), make_model()
    for p in other.parameters():
        p.data.mul_(-1)
    deployed, other_deployed = optimize_for_inference(model), optimize_for_inference(other)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, other_want = model(x), other(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    for clone in (deployed, copy.deepcopy(deployed), pickle.loads(pickle.dumps(deployed))):
        torch.testing.assert_close(clone(x), want, atol=1e-4, rtol=0)
    deployed.model.load_state_dict(other_deployed.model.state_dict())
    torch.testing.assert_close(deployed(x), other_want, atol=1e-4, rtol=0)


def test_deploy_leaves_the_original_model_alone_and_forwards_attributes():
    model = make_model().train()
    deployed = optimize_for_inference(model)
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)
    assert next(model.parameters()).requires_grad
    assert isinstance(deployed, InferenceModel) and not deployed.training
    assert deployed.num_classes == 10 and deployed.feature_info == model.feature_info
    assert deployed.pretrained_cfg['architecture'] == 'conformer_nano_patch4'
    assert deployed(torch.randn(1, 3, 32, 32)).requires_grad is False


@BF16_EMULATED
def test_bf16_deploy_returns_fp32_close_to_eager():
    model = make_model(num_classes=100)
    deployed = optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    got = deployed(x)
    assert got.dtype == torch.float32
    # weights are cast once at deploy time; the original stays fp32
    assert all(p.dtype == torch.bfloat16 for p in deployed.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: a few per cent of the logit scale
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@BF16_EMULATED
def test_bf16_deploy_runs_every_layer_in_bf16_and_takes_fp32_inputs_on_every_method():
    """No layer hands fp32 on (norms, residual sums and softmax outputs included), so no call
    converts activations back and forth; fp32 inputs and features are cast on the way in."""
    deployed = optimize_for_inference(make_model(num_classes=10), dtype=torch.bfloat16)
    dtypes = set()
    for module in deployed.model.modules():
        module.register_forward_hook(lambda m, args, out: dtypes.update(
            t.dtype for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()))
    x = torch.randn(2, 3, 32, 32)
    features = deployed.forward_features(x)
    assert dtypes == {torch.bfloat16}, f'layers returned {dtypes}'
    assert [f.dtype for f in features] == [torch.float32, torch.float32]
    torch.testing.assert_close(deployed.forward_head(features), deployed(x), rtol=0, atol=0)
    intermediates = deployed.forward_intermediates(x)
    assert all(t.dtype == torch.float32 for t in torch.utils._pytree.tree_leaves(intermediates))


def test_bf16_deploy_without_native_bf16_warns_and_keeps_layers_off_onednn(monkeypatch):
    """oneDNN refuses bf16 weights on such CPUs: the deploy must not hand them to it."""
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    model = make_model()
    with pytest.warns(UserWarning, match='without native bf16.*dtype=torch.float32'):
        deployed = optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    assert not onednn_ops(lambda: deployed(x))
    with torch.no_grad():
        want = model(x)
    assert (deployed(x) - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize('dtype', [torch.float16, torch.float64])
def test_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match='torch.float32, torch.bfloat16 or torch.int8'):
        optimize_for_inference(make_model(), dtype=dtype)


def test_deployed_model_cannot_be_trained_or_redeployed():
    deployed = optimize_for_inference(make_model())
    with pytest.raises(RuntimeError, match='inference only'):
        deployed.train()
    with pytest.raises(ValueError, match='original model'):
        optimize_for_inference(deployed)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_deployed_model_traces_as_one_graph(dtype):
    """torch.compile sees the whole deployed model: a graph break per layer (a backend check
    dynamo cannot trace, say) would leave inductor one small graph per layer and, past its
    recompile limit, run the rest eagerly."""
    deployed = optimize_for_inference(make_model(), dtype=dtype)
    x = torch.randn(1, 3, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        explained = torch._dynamo.explain(deployed.model)(x)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


@pytest.mark.slow
def test_compiled_fp32_deploy_matches_eager_and_calls_kernels_from_cpp():
    """Compiled on the CPU, the graph's kernels are called by inductor's C++ wrapper (no
    Python between them), and the answers stay those of the eager model."""
    model = make_model()
    deployed = optimize_for_inference(model, compile=True)
    for shape in [(2, 3, 32, 32), (1, 3, 40, 32)]:  # a new shape compiles again
        x = torch.randn(shape)
        with torch.no_grad():
            out, code = run_and_get_code(deployed, x)
            torch.testing.assert_close(out, model(x), atol=1e-4, rtol=0)
        assert len(code) == 1 and 'CppWrapperCodeCache' in code[0], code[0][:500]


def fashion_mnist_tensors(split):
    """(images as normalised (N, 1, 28, 28) floats, labels); fails, naming the package, if the
    dataset is not installed."""
    from conformer.data.fashion_mnist import MEAN, STD, FashionMNIST
    try:
        data = FashionMNIST(split=split, download=False)
    except FileNotFoundError as e:
        pytest.fail(f'this test needs the real Fashion-MNIST files: {e}')
    return (data.images[:, None].float() / 255 - MEAN[0]) / STD[0], data.targets


@pytest.mark.slow
@BF16_EMULATED
def test_bf16_deploy_keeps_top1_on_a_real_evaluation_set():
    """The documented bf16 tolerance: the same top-1 as eager fp32 on >= 99% of real images
    (a small nano Conformer briefly trained on Fashion-MNIST, evaluated on 2000 test images)."""
    torch.manual_seed(0)
    images, labels = fashion_mnist_tensors('train')
    model = timm.create_model('conformer_nano_patch4', in_chans=1, num_classes=10, patch_size=8,
                              base_channel=16, embed_dim=96, num_heads=3)
    model.set_dual_head_training(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(300):
        idx = torch.randint(len(labels), (64,))
        conv_logits, trans_logits = model(images[idx])
        loss = (nn.functional.cross_entropy(conv_logits, labels[idx])
                + nn.functional.cross_entropy(trans_logits, labels[idx])) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = fashion_mnist_tensors('test')
    test_images, test_labels = test_images[:2000], test_labels[:2000]
    deployed = optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = torch.cat([model(b) for b in test_images.split(250)]).argmax(-1)
    bf16 = torch.cat([deployed(b) for b in test_images.split(250)]).argmax(-1)
    accuracy = (eager == test_labels).float().mean().item()
    assert accuracy > 0.7, f'the model did not train (accuracy {accuracy:.3f}); the check is void'
    agreement = (bf16 == eager).float().mean().item()
    assert agreement >= 0.99, f'bf16 agrees with fp32 on {agreement:.4f} of the test images'
