"""conformer.deploy: BatchNorm folding, the deployed model's API and its documented tolerances."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
import conformer  # noqa: F401
from timm.layers import Mlp
from conformer.deploy import (FusedConvBlock, InferenceModel, OneDNNConv2d, OneDNNLinear,
                              fold_batchnorm, optimize_for_inference, use_onednn_convs,
                              use_onednn_linears)
from conformer.layers import ConvBlock
from conformer.runtime import native_bf16

NATIVE_BF16 = native_bf16(torch.device('cpu'))
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


@pytest.mark.parametrize('approximate, fused', [('none', True), ('tanh', False)])
def test_onednn_linears_match_nn_linear_and_fuse_only_the_exact_gelu(approximate, fused,
                                                                     monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(16, 40, act_layer=lambda: nn.GELU(approximate=approximate)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = mlp(x)
        assert use_onednn_linears(mlp) == 2
        assert isinstance(mlp.fc1, OneDNNLinear) and isinstance(mlp.fc2, OneDNNLinear)
        assert mlp.fc1.fuse_gelu is fused and isinstance(mlp.act, nn.Identity) is fused
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    assert list(mlp.state_dict()) == ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    # off the CPU (here: the meta device, shapes only) it runs the plain PyTorch ops
    for name in ('onednn_linear', '_linear_pointwise'):  # calling either would raise
        monkeypatch.setattr(f'conformer.deploy.{name}', None)
    assert mlp.to('meta')(x.to('meta')).shape == expected.shape


@pytest.mark.parametrize('dtype, compile, onednn_linears, onednn_convs', [
    (torch.float32, False, True, True), (torch.bfloat16, False, NATIVE_BF16, NATIVE_BF16),
    (torch.float32, True, True, False),  # inductor's freezing packs convolutions itself
    (torch.bfloat16, True, False, False)])  # and bf16 linears
@BF16_EMULATED
def test_cpu_deploy_runs_layers_through_onednn_unless_inductor_packs_them(
        dtype, compile, onednn_linears, onednn_convs):
    deployed = optimize_for_inference(make_model(), dtype=dtype, compile=compile)
    linears = [m for m in deployed.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
    assert linears and all(isinstance(m, OneDNNLinear) is onednn_linears for m in linears)
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, OneDNNConv2d) is onednn_convs for m in convs)
    assert all(m.weight.dtype == dtype for m in linears + convs)


@pytest.mark.parametrize('dtype, tolerance', [
    (torch.float32, 1e-5),
    pytest.param(torch.bfloat16, 1e-2, marks=pytest.mark.skipif(
        not NATIVE_BF16, reason='oneDNN takes bf16 only on CPUs with native bf16'))],
    ids=['fp32', 'bf16'])
@pytest.mark.parametrize('conv', [
    nn.Conv2d(8, 16, 3, stride=2, padding=1),
    nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4, bias=False),
    nn.Conv2d(8, 16, 1)], ids=['strided', 'dilated-grouped', 'pointwise'])
def test_onednn_conv_matches_nn_conv2d_as_the_input_shape_and_layout_change(
        conv, dtype, tolerance):
    import copy
    torch.manual_seed(0)
    conv = copy.deepcopy(conv).eval().to(dtype)
    holder = nn.Sequential(copy.deepcopy(conv).requires_grad_(False))
    assert use_onednn_convs(holder) == 1
    fast = holder[0]
    assert isinstance(fast, OneDNNConv2d) and list(fast.state_dict()) == list(conv.state_dict())
    with torch.no_grad():
        # each new shape repacks the weight; going back to an old one must repack again
        for shape in [(2, 8, 9, 11), (1, 8, 16, 16), (2, 8, 9, 11)]:
            for channels_last in (True, False):
                x = torch.randn(shape, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(fast(x), conv(x), atol=tolerance, rtol=tolerance)
        # the fused residual add and ReLU, with the residual in NCHW
        fast.fuse_relu = True
        residual = torch.randn_like(conv(x), memory_format=torch.contiguous_format)
        torch.testing.assert_close(fast(x, add=residual), F.relu(conv(x) + residual),
                                   atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(fast(x), F.relu(conv(x)), atol=tolerance, rtol=tolerance)
        # off the CPU (here: the meta device, shapes only) it runs the plain PyTorch ops
        fast, x, residual = fast.to('meta'), x.to('meta'), residual.to('meta')
        assert fast(x, add=residual).shape == residual.shape


def test_cpu_deploy_fuses_every_relu_into_its_conv_and_still_copies():
    import copy
    import pickle
    model = make_model()
    deployed = optimize_for_inference(model)
    assert not any(type(m) is nn.ReLU for m in deployed.modules())
    blocks = [m for m in deployed.modules() if isinstance(m, ConvBlock)]
    assert blocks and all(type(b) is FusedConvBlock and b.conv3.fuse_relu for b in blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        for clone in (deployed, copy.deepcopy(deployed), pickle.loads(pickle.dumps(deployed))):
            torch.testing.assert_close(clone(x), want, atol=1e-4, rtol=0)


def test_onednn_conv_leaves_convs_it_cannot_run_alone(monkeypatch):
    monkeypatch.setattr('conformer.runtime.native_bf16', lambda device: False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding='same'),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'),
                          nn.Conv2d(4, 4, 3).to(torch.bfloat16))  # no native bf16
    assert use_onednn_convs(model) == 0
    assert all(type(m) is nn.Conv2d for m in model)


@pytest.mark.parametrize('make, fast_layer, shape', [
    (lambda: nn.Linear(16, 8), OneDNNLinear, (3, 16)),
    (lambda: nn.Conv2d(16, 8, 3, padding=1), OneDNNConv2d, (2, 16, 7, 7))],
    ids=['linear', 'conv'])
def test_packed_weight_follows_a_changed_weight_and_survives_copies(make, fast_layer, shape):
    """The packed copy of the weight must follow load_state_dict, and deepcopy/pickle must
    work after a call has packed it (an opaque oneDNN tensor copies neither way)."""
    import copy
    import pickle
    torch.manual_seed(0)
    linear, other = make().eval(), make().eval()
    x = torch.randn(shape)
    fast = fast_layer(copy.deepcopy(linear)).requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-5)
        fast.load_state_dict(other.state_dict())
        torch.testing.assert_close(fast(x), other(x), atol=1e-5, rtol=1e-5)
        for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            torch.testing.assert_close(clone(x), other(x), atol=1e-5, rtol=1e-5)


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


def test_bf16_deploy_without_native_bf16_warns_and_keeps_plain_linears(monkeypatch):
    """oneDNN refuses bf16 weights on such CPUs: the deploy must not hand them to it."""
    monkeypatch.setattr('conformer.runtime.native_bf16', lambda device: False)
    model = make_model()
    with pytest.warns(UserWarning, match='without native bf16.*dtype=torch.float32'):
        deployed = optimize_for_inference(model, dtype=torch.bfloat16)
    linears = [m for m in deployed.modules() if isinstance(m, (nn.Linear, OneDNNLinear))]
    assert linears and all(type(m) is nn.Linear for m in linears)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert (deployed(x) - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize('dtype', [torch.float16, torch.float64])
def test_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match='float32 or torch.bfloat16'):
        optimize_for_inference(make_model(), dtype=dtype)


def test_deployed_model_cannot_be_trained_or_redeployed():
    deployed = optimize_for_inference(make_model())
    with pytest.raises(RuntimeError, match='inference only'):
        deployed.train()
    with pytest.raises(ValueError, match='original model'):
        optimize_for_inference(deployed)


@pytest.mark.slow
def test_compiled_fp32_deploy_matches_eager():
    model = make_model()
    deployed = optimize_for_inference(model, compile=True)
    for shape in [(2, 3, 32, 32), (1, 3, 40, 32)]:  # a new shape compiles again
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=0)


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
