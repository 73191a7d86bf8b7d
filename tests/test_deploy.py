"""conformer.deploy: BatchNorm folding, the deployed model's API and its documented tolerances."""
import pytest
import torch
from torch import nn

import timm
import conformer  # noqa: F401
from conformer.deploy import InferenceModel, fold_batchnorm, optimize_for_inference


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


def test_deploy_leaves_the_original_model_alone_and_forwards_attributes():
    model = make_model().train()
    deployed = optimize_for_inference(model)
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)
    assert next(model.parameters()).requires_grad
    assert isinstance(deployed, InferenceModel) and not deployed.training
    assert deployed.num_classes == 10 and deployed.feature_info == model.feature_info
    assert deployed.pretrained_cfg['architecture'] == 'conformer_nano_patch4'
    assert deployed(torch.randn(1, 3, 32, 32)).requires_grad is False


def test_bf16_deploy_returns_fp32_close_to_eager():
    model = make_model(num_classes=100)
    deployed = optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    got = deployed(x)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a few per cent of the logit scale
    assert (got - want).abs().max() < 0.05 * want.abs().max()


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
