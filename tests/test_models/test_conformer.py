"""The Conformer family against the paper's code and the timm model contract."""
import copy
import re

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F

import conformer  # noqa: F401  (registers the variants)
from conformer.models import Conformer, check_model_name

from helpers import REPO
from helpers.golden import GOLDEN_CASES, GOLDEN_FILE, fill_state_dict, golden_input

PAPER_VARIANTS = ['conformer_tiny_patch16', 'conformer_small_patch16',
                  'conformer_small_patch32', 'conformer_base_patch16']
# a narrow tiny-family model (ImageNet stem, 4 taps) that runs in milliseconds
SMALL_KW = dict(embed_dim=64, num_heads=2, base_channel=16, num_classes=10)


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN_FILE, weights_only=True)


def small_model(**kw) -> Conformer:
    torch.manual_seed(0)
    return timm.create_model('conformer_tiny_patch16', **{**SMALL_KW, **kw}).eval()


def train_with_frozen_bn(model: Conformer) -> Conformer:
    """Train mode (both heads returned) with BatchNorm on its running statistics."""
    model.train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    return model


def test_every_variant_is_registered():
    names = timm.list_models('conformer*')
    assert set(PAPER_VARIANTS) | {'conformer_nano_patch4'} <= set(names)


@pytest.mark.parametrize('variant,millions', [
    ('conformer_tiny_patch16', 23.52), ('conformer_small_patch16', 37.67),
    ('conformer_small_patch32', 38.85), ('conformer_base_patch16', 83.29)])
def test_parameter_count_matches_paper(variant, millions):
    model = timm.create_model(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize('variant', PAPER_VARIANTS)
def test_state_dict_names_and_shapes_match_paper(variant, golden):
    ours = {k: list(v.shape) for k, v in timm.create_model(variant).state_dict().items()}
    assert ours == golden['shapes'][variant]


@pytest.mark.parametrize('variant,batch,height,width', GOLDEN_CASES)
def test_logits_match_paper_code(variant, batch, height, width, golden):
    """Same weights, same input: both heads within 1e-4 of the paper's conformer.py."""
    model = timm.create_model(variant).eval()
    model.load_state_dict(fill_state_dict(model.state_dict()))
    x = golden_input(batch, height, width)
    expected = golden[f'{variant}@{height}x{width}']
    model.set_dual_head_training(True)
    with torch.no_grad():
        summed = model(x)  # eval mode: the paper's evaluation, the sum of the heads
        conv_logits, trans_logits = train_with_frozen_bn(model)(x)
    assert (conv_logits - expected[0]).abs().max() <= 1e-4
    assert (trans_logits - expected[1]).abs().max() <= 1e-4
    assert (summed - expected.sum(0)).abs().max() <= 1e-4


def test_dual_head_training_returns_both_heads_only_in_train_mode():
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        summed = model(x)
        model.set_dual_head_training(True)
        assert torch.equal(model(x), summed)  # eval mode still sums
        conv_logits, trans_logits = train_with_frozen_bn(model)(x)
    torch.testing.assert_close(conv_logits + trans_logits, summed)


@pytest.mark.parametrize('hw', [(241, 241), (321, 221), (32, 32), (33, 47), (100, 68)])
def test_any_input_size_from_32px(hw):
    model = small_model()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *hw))
        maps = model.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert [m.shape[-2] for m in maps] == [-(-hw[0] // r) for r in (4, 8, 16, 32)]


@pytest.mark.parametrize('hw', [(28, 28), (33, 47), (8, 8)])
def test_the_pooled_stem_halves_every_stage_and_keeps_odd_edges(hw):
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', stem_type='pooled', patch_size=8,
                              in_chans=1, num_classes=10).eval()
    assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16]
    x = torch.randn(2, 1, *hw)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
        x_base = model.act1(model.bn1(model.conv1(x)))
        pooled = model.maxpool(x_base)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    half = (-(-hw[0] // 2), -(-hw[1] // 2))
    assert pooled.shape[-2:] == half  # an odd last row or column is pooled, not dropped
    assert torch.equal(pooled[..., -1, -1], x_base[..., 2 * half[0] - 2:, 2 * half[1] - 2:]
                       .amax((-2, -1)))
    assert [m.shape[-2] for m in maps][0] == half[0]


def test_fcu_generalisation_reduces_to_paper_ops_on_divisible_sizes():
    """Adaptive pooling onto the token grid / resizing to the CNN map equal the paper's
    AvgPool(dw) and 'nearest upsample by dw' when the sizes divide."""
    x = torch.randn(2, 8, 56, 28)
    torch.testing.assert_close(F.adaptive_avg_pool2d(x, (14, 7)), F.avg_pool2d(x, 4),
                               rtol=0, atol=1e-6)
    t = torch.randn(2, 8, 14, 7)
    assert torch.equal(F.interpolate(t, size=(56, 28)),
                       t.repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match='smaller than the patch size 16.*at least 16 px'):
        small_model()(torch.randn(1, 3, 12, 64))


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match='3-channel images.*in_chans=1'):
        small_model()(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='add a batch dimension'):
        small_model()(torch.randn(3, 64, 64))


def test_grayscale_in_chans():
    model = small_model(in_chans=1)
    assert model.conv1.weight.shape[1] == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize('kwargs,message', [
    (dict(depth=10), 'depth must be a multiple of 3'),
    (dict(depth=3), 'at least 6'),
    (dict(num_classes=-1), 'num_classes must be an integer >= 0'),
    (dict(in_chans=0), 'in_chans must be a positive integer'),
    (dict(stem_type='cifar'), "stem_type must be one of \\['imagenet', 'pooled', 'small'\\]"),
    (dict(stem_type='pooled', patch_size=12), 'patch_size must be a multiple of 8'),
    (dict(patch_size=8), 'patch_size must be a multiple of 16'),
    (dict(num_heads=5), 'embed_dim 64 must be divisible by num_heads 5'),
    (dict(drop_path_rate=1.5), 'drop_path_rate must be in \\[0, 1\\)'),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_model(**kwargs)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('conformer_small_patch8')


@pytest.mark.parametrize('name', ['conformer_small_patch16', 'conformer_small_patch16.in1k',
                                  'hf-hub:ORG/nano-fmnist', 'local-dir:/weights/nano'])
def test_model_names_timm_can_build_pass_the_check(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize('name, message', [
    ('conformer_small_patch8', "unknown model 'conformer_small_patch8'; choose one of "
                               "conformer_base_patch16, conformer_nano_patch4, "),
    ('resnet50', "unknown model 'resnet50'; choose one of"),
    ('conformer_small_patch16.in21k', "no weights tagged 'in21k'; choose one of "
                                      "conformer_small_patch16.in1k"),
    ('ORG/nano-fmnist', "Use 'hf-hub:ORG/nano-fmnist'"),
])
def test_model_names_timm_cannot_build_name_the_choices(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_model_name(name)


def test_pretrained_cfg_and_data_config():
    model = timm.create_model('conformer_small_patch16')
    cfg = model.pretrained_cfg
    assert cfg['classifier'] == ('conv_cls_head', 'trans_cls_head')
    assert cfg['first_conv'] == 'conv1'
    assert cfg['license'] == 'apache-2.0' and cfg['paper_ids'] == 'arXiv:2105.03889'
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 224, 224)
    assert data_cfg['interpolation'] == 'bicubic' and data_cfg['crop_pct'] == 0.875
    assert timm.data.resolve_data_config({}, model=timm.create_model(
        'conformer_nano_patch4'))['input_size'] == (3, 32, 32)


def test_features_and_heads():
    model = small_model()
    x = torch.randn(2, 3, 96, 64)
    cnn_map, tokens = model.forward_features(x)
    assert cnn_map.shape == (2, 64, 3, 2) and tokens.shape == (2, 1 + 6 * 4, 64)
    pooled = model.forward_head((cnn_map, tokens), pre_logits=True)
    assert pooled.shape == (2, model.num_features) == (2, 64 + 64)
    torch.testing.assert_close(pooled, torch.cat([cnn_map.mean((2, 3)), tokens[:, 0]], 1))
    expected = model.conv_cls_head(pooled[:, :64]) + model.trans_cls_head(pooled[:, 64:])
    torch.testing.assert_close(model(x), expected)


def test_num_classes_zero_and_reset_classifier():
    model = small_model(num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(5)
    conv_head, trans_head = model.get_classifier()
    assert conv_head.out_features == 5 and trans_head.out_features == 5
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(5, global_pool='max')


def test_features_only_gives_paper_detection_taps():
    model = timm.create_model('conformer_tiny_patch16', features_only=True,
                              **{**SMALL_KW, 'num_classes': 1000})
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 64]
    assert model.feature_info.module_name() == [
        'conv_trans_4', 'conv_trans_8', 'conv_trans_11', 'conv_trans_12']
    maps = model(torch.randn(1, 3, 128, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (16, 32, 24), (32, 16, 12), (64, 8, 6), (64, 4, 3)]
    picked = timm.create_model('conformer_tiny_patch16', features_only=True, out_indices=(1, 3),
                               **{**SMALL_KW, 'num_classes': 1000})
    assert picked.feature_info.reduction() == [8, 32]


def test_forward_intermediates_match_block_outputs():
    """The taps are the CNN-branch outputs of blocks 4, 8, 11, 12, collected by hooks."""
    model = small_model()
    x = torch.randn(1, 3, 64, 96)
    hooked = {}
    for name in ('conv_trans_4', 'conv_trans_8', 'conv_trans_11', 'conv_trans_12'):
        getattr(model, name).register_forward_hook(
            lambda mod, inp, out, name=name: hooked.__setitem__(name, out[0]))
    features, maps = model.forward_intermediates(x)
    by_block = sorted(hooked, key=lambda n: int(n.split('_')[-1]))
    assert all(torch.equal(m, hooked[n]) for m, n in zip(maps, by_block))
    torch.testing.assert_close(model.forward_head(features), model(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [m.shape for m in last_two] == [m.shape for m in maps[2:]]
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert torch.equal(early[0], maps[0])


def test_prune_intermediate_layers_keeps_taps():
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    full = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    model.prune_intermediate_layers([0, 1])
    assert not hasattr(model, 'conv_trans_9') and hasattr(model, 'conv_trans_8')
    pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(full, pruned))


def test_grad_checkpointing_gives_same_output_and_grads():
    model = small_model().train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        torch.manual_seed(1)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run()
    model.set_grad_checkpointing(True)
    out, grads = run()
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_drop_path_rises_over_transformer_blocks_only():
    model = small_model(drop_path_rate=0.11)
    rates = [model.trans_1.drop_path] + [
        getattr(model, f'conv_trans_{i}').trans_block.drop_path for i in range(2, 13)]
    assert rates[0].__class__.__name__ == 'Identity'  # rate 0 for the first block
    assert [round(r.drop_prob, 4) for r in rates[1:]] == [round(0.01 * i, 4) for i in range(1, 12)]
    assert not any('drop_path' in n for n, _ in model.conv_trans_5.cnn_block.named_modules())


def test_optimizer_helpers():
    model = small_model()
    assert model.no_weight_decay() == {'cls_token'}
    groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) == 14  # stem, blocks 1..12, final norm + heads
    named = dict(model.named_parameters())
    stem = [g for g in groups if g['lr_scale'] == scales[0]]
    assert {id(p) for g in stem for p in g['params']} == {
        id(p) for n, p in named.items()
        if n.split('.')[0] in ('cls_token', 'conv1', 'bn1', 'trans_patch_conv')}
    assert sum(len(g['params']) for g in groups) == len(named)


def test_torchscript_matches_eager():
    model = small_model()
    x = torch.randn(2, 3, 80, 112)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_fx_trace_matches_eager_at_other_sizes():
    model = small_model()
    graph = torch.fx.symbolic_trace(model)
    for hw in ((64, 64), (97, 130)):
        x = torch.randn(1, 3, *hw)
        torch.testing.assert_close(graph(x), model(x))


def test_fx_graph_traced_in_eval_trains_with_batch_statistics():
    """The layers hand BatchNorm to the ops as live modules, so a graph traced in eval mode
    normalises with batch statistics, and updates them, once put in train mode."""
    from conformer.layers import ConvBlock, FCUUp
    torch.manual_seed(0)
    block, up = ConvBlock(8, 16, res_conv=True).eval(), FCUUp(16, 4).eval()
    for module, args in ((block, (torch.randn(2, 8, 6, 6),)),
                         (up, (torch.randn(2, 10, 16), (3, 3), torch.randn(2, 4, 6, 6)))):
        graph = torch.fx.symbolic_trace(
            module, concrete_args={'fusion': None} if module is block else None)
        torch.testing.assert_close(graph(*args), module(*args))
        reference = copy.deepcopy(module).train()
        graph.train()
        torch.testing.assert_close(graph(*args), reference(*args))
        stats = [[m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                 for model in (module, reference)]
        assert all(mean.abs().sum() > 0 for mean in stats[0])  # the graph's BNs updated them
        torch.testing.assert_close(stats[0], stats[1])


def test_channels_last_input_matches():
    model = small_model()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_torch_compile_matches_eager():
    model = timm.create_model('conformer_nano_patch4', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_nano_variant_takes_small_images():
    model = timm.create_model('conformer_nano_patch4', in_chans=1, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) < 2e6
    for hw in ((28, 28), (32, 32), (64, 64)):
        assert model(torch.randn(2, 1, *hw)).shape == (2, 10)
    assert model.feature_info[0]['reduction'] == 1  # the small stem keeps full resolution


def test_hubconf_lists_every_variant():
    repo = REPO
    model = torch.hub.load(str(repo), 'conformer_tiny_patch16', source='local', **SMALL_KW)
    assert isinstance(model, Conformer) and model.num_classes == 10
    entry_points = torch.hub._load_entry_from_hubconf
    hubconf = torch.hub._import_module('hubconf', str(repo / 'hubconf.py'))
    for name in PAPER_VARIANTS + ['conformer_nano_patch4']:
        assert callable(entry_points(hubconf, name))


def test_triton_backend_matches_torch_under_interpreter():
    """Every fused kernel (conv+BN+act, FCU down/up, attention) in one eval forward."""
    model = small_model(depth=6)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
        model.set_kernel_backend('triton')
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_triton_attention_trains_under_interpreter():
    """In train mode the attention kernel runs both ways; convs stay on PyTorch modules."""
    model = small_model(depth=6).train()
    x = torch.randn(2, 3, 32, 48)

    def grads(backend):
        model.set_kernel_backend(backend)
        model.zero_grad()
        torch.manual_seed(0)
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    fused, reference = grads('triton'), grads('torch')
    scale = max(g.abs().max().item() for g in reference)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)


def test_kernel_backend_context_and_bad_name():
    from conformer.kernels import use_backend
    model = small_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), use_backend('torch'):
        torch.testing.assert_close(model(x), model.eval()(x))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        model.set_kernel_backend('cuda')


def test_model_table_counts_params_and_macs():
    from conformer.layers import Attention
    from conformer.models.profile import count_flops, model_table
    linear = torch.nn.Linear(7, 5)
    assert count_flops(linear, torch.zeros(3, 7)) == 2 * 3 * 7 * 5
    # attention (SDPA on the CPU) counts its two batched products, q @ k^T and p @ v
    B, N, C, heads = 2, 17, 48, 6
    attention = Attention(C, heads, qkv_bias=True).eval()
    projections = 2 * B * N * C * (3 * C + C)
    assert count_flops(attention, torch.zeros(B, N, C)) == projections + 2 * (2 * B * N * N * C)
    (row,) = model_table(['conformer_nano_patch4'])
    model = timm.create_model('conformer_nano_patch4')
    assert row['params_m'] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert row['input_size'] == [3, 32, 32] and 0 < row['macs_g'] < 1


def test_builds_on_the_meta_device():
    """Shape-only construction (for large-model init and checkpoint inspection)."""
    with torch.device('meta'):
        model = timm.create_model('conformer_base_patch16')
    assert model.conv1.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == 83289136


def test_model_table_refuses_an_output_folder_before_counting(tmp_path, capsys):
    from conformer.cli.model_table import main
    with pytest.raises(SystemExit) as exit_info:
        main(['--out', str(tmp_path)])
    assert exit_info.value.code == 2
    assert f'--out {tmp_path} is a folder' in capsys.readouterr().err
