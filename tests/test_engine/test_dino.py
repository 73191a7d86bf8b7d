"""DINO self-supervised pretraining through the one training loop: the loss against its
formula, multi-crop views, no collapse with centring and a reported collapse without it,
bitwise resume after SIGKILL (teacher, centre, head), two gloo ranks against one, and the
transfer of the pretrained backbone through model.checkpoint."""
import math
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conformer.data import GlobalBatchSampler, SeededTransform
from conformer.data.multicrop import MultiCrop
from conformer.engine.cli import config_dir
from conformer.engine.config import check
from conformer.engine.methods.dino import DINO, DINOHead

from helpers.image_folders import make_folder
from helpers.train_runs import kill_and_resume, load, run_train

ARCH = ['model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
        'model.num_heads=2', 'model.depth=6', 'model.patch_size=4']
RUN = ['data.input_size=16', 'data.eval_batch_size=16', 'data.num_workers=0',
       'data.batch_size=8', 'trainer.threads=1', 'trainer.deterministic=true',
       'logging.progress=false', 'logging.every_steps=2']
DINO_TINY = ARCH + RUN + [
    'model.drop_path_rate=0.1', 'aug=none', 'aug.train_crop=rrc', 'data.crop_pct=1.0',
    'method=dino', 'method.out_dim=64', 'method.hidden_dim=32', 'method.bottleneck_dim=16',
    'method.global_size=16', 'method.local_size=8', 'method.local_crops=2',
    'method.warmup_teacher_temp_epochs=1', 'optim.lr=3e-3', 'optim.weight_decay=0.04',
    'optim.clip_grad=3.0']


def run_cli(run_dir, *overrides, monitor=False, **kw):
    """A tiny DINO run; without `monitor`, the collapse check is off: tiny runs on a few
    dozen images collapse within steps, and these tests are about the mechanics."""
    return run_train(DINO_TINY, run_dir, *overrides,
                     *([] if monitor else ['method.collapse_std=0']), **kw)


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir(), version_base='1.3'):
        return compose('train', overrides=list(overrides))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('images'))


def test_the_loss_is_the_cross_entropy_of_every_student_crop_against_the_other_global():
    cfg = OmegaConf.create({'method': {'out_dim': 5, 'student_temp': 0.1, 'centering': True,
                                       'center_momentum': 0.9}})
    method = DINO(cfg)
    method.center = torch.randn(1, 5)
    torch.manual_seed(0)
    batch, crops = 3, 4
    student, teacher = torch.randn(crops * batch, 5), torch.randn(2 * batch, 5)
    loss, probs = method.loss(student, teacher, temp=0.04, crops=crops)
    t = [F.softmax((teacher[i * batch:(i + 1) * batch] - method.center) / 0.04, -1)
         for i in range(2)]
    s = [F.log_softmax(student[j * batch:(j + 1) * batch] / 0.1, -1) for j in range(crops)]
    terms = [-(t[i] * s[j]).sum(-1).mean() for i in range(2) for j in range(crops) if i != j]
    assert len(terms) == 2 * crops - 2
    torch.testing.assert_close(loss, sum(terms) / len(terms))
    torch.testing.assert_close(probs, torch.cat(t))


def test_the_head_ends_in_a_unit_norm_weight_normalised_layer():
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
    x = torch.randn(5, 8)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    expected = bottleneck @ F.normalize(head.last_layer.weight, dim=1).T
    torch.testing.assert_close(head(x), expected)
    assert 'last_layer_norm' not in dict(head.named_parameters())  # fixed at 1
    learnt = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4, norm_last_layer=False)
    assert len(learnt.last_layer_parameters()) == 2


def test_multicrop_gives_two_global_and_n_local_crops_the_same_for_the_same_key():
    images = [Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()) for _ in range(4)]
    crops = MultiCrop(32, 16, 3, (0.4, 1.0), (0.05, 0.4), mean=[0.5], std=[0.5])
    view = SeededTransform(list(zip(images, [-1] * 4)), crops)
    sampled = list(GlobalBatchSampler(4, 4, seed=0))
    first, again = view.__getitems__(sampled), view.__getitems__(sampled)
    views, target = first[0]
    assert target == -1
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 3
    for (a, _), (b, _) in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # a resumed loader's crops
    other = view.__getitems__([(i, s + 1) for i, s in sampled])
    assert not torch.equal(first[0][0][0], other[0][0][0])


def test_multicrop_jitters_the_brightness_of_gray_crops():
    # A flat gray image stays flat and keeps its value under crops, flips, blur and (below 128)
    # solarisation; only brightness jitter moves it, in DINO's range of 0.6x to 1.4x.
    flat = Image.fromarray(torch.full((28, 28), 100, dtype=torch.uint8).numpy())
    crops = MultiCrop(28, 16, 2, (0.4, 1.0), (0.05, 0.4), mean=[0.0], std=[1.0])
    torch.manual_seed(0)
    views = [view for _ in range(20) for view in crops(flat)]
    assert all(view.max() - view.min() <= 1 / 255 for view in views)  # still flat
    scale = torch.stack([view.mean() for view in views]) / (100 / 255)
    assert 0.6 - 1 / 100 <= scale.min() and scale.max() <= 1.4 + 1 / 100
    moved = (scale - 1).abs() > 1 / 100
    assert 0.6 < moved.float().mean() < 0.95  # jitter with probability 0.8


def test_dino_refuses_settings_it_cannot_honour():
    for overrides, message in ((['trainer.ema=true'], 'trainer.ema=false'),
                               (['trainer.fsdp=true'], 'trainer.fsdp=true'),
                               (['method.local_size=2'], 'smaller than the patch size'),
                               (['method.local_scale=[0.5,0.1]'], 'method.local_scale')):
        cfg = compose_cfg(*DINO_TINY, 'data.root=/data', *overrides)
        with pytest.raises(ValueError, match=message.replace('.', r'\.')):
            check(cfg, world_size=1)


def test_without_centring_the_run_collapses_and_the_monitor_stops_it(folder, tmp_path):
    proc = run_cli(tmp_path / 'collapsed', f'data.root={folder}', 'trainer.epochs=6',
                   'method.centering=false', 'method.momentum_teacher=0.9',
                   'method.collapse_std=0.05', 'method.collapse_after=8', monitor=True,
                   wait=False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert 'the representation collapsed by epoch' in out, out
    assert 'onto a few dimensions (centring prevents this: set method.centering=true)' in out
    assert 'Traceback' not in out
    records = [r for r in load_jsonl(tmp_path / 'collapsed' / 'metrics.jsonl') if 'std' in r]
    assert records[-1]['std'] < 0.05 < records[0]['std']  # it was not collapsed at the start


def load_jsonl(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_dino_state(a, b):
    for key in ('model', 'state_dict_ema', 'dino_head', 'dino_teacher_head'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'
    assert torch.equal(a['dino_center'], b['dino_center'])
    flat = lambda s: [t for st in s['optimizer']['state'].values() for t in st.values()  # noqa
                      if isinstance(t, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))


def test_a_dino_run_killed_with_sigkill_resumes_bitwise(folder, tmp_path):
    common = [f'data.root={folder}', 'trainer.epochs=3', 'trainer.ckpt_every_steps=1']
    run_cli(tmp_path / 'whole', *common)
    out = kill_and_resume(run_cli, tmp_path / 'killed', *common, kill_at=6, total=12)  # epoch 2
    assert 'k-NN top-1' in out
    whole = load(tmp_path / 'whole' / 'checkpoints' / 'last.pth')
    assert whole['step'] == 12 and whole['dino_center'].abs().sum() > 0
    assert_same_dino_state(whole, load(tmp_path / 'killed' / 'checkpoints' / 'last.pth'))


def test_two_gloo_ranks_keep_one_teacher_and_centre_equal_to_one_process(folder, tmp_path):
    # same global batch (8) and micro-batch (4): 2 ranks vs 1 rank x 2 accumulation steps
    common = [f'data.root={folder}', 'trainer.epochs=1', 'model.drop_path_rate=0.0']
    two_procs = (sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node=2')
    run_cli(tmp_path / 'one', *common, 'trainer.accum_steps=2')
    run_cli(tmp_path / 'ddp', *common, launcher=two_procs)
    one = load(tmp_path / 'one' / 'checkpoints' / 'last.pth')
    two = load(tmp_path / 'ddp' / 'checkpoints' / 'last.pth')
    assert two['world_size'] == 2 and one['step'] == two['step'] == 4
    torch.testing.assert_close(two['dino_center'], one['dino_center'], rtol=1e-4, atol=1e-5)
    for key in ('state_dict_ema', 'dino_teacher_head'):  # weights (BN statistics differ)
        for name, value in one[key].items():
            if name.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked'):
                continue
            torch.testing.assert_close(two[key][name], value, rtol=1e-4, atol=1e-5,
                                       msg=f'{key}.{name}')


def test_the_pretrained_backbone_transfers_through_model_checkpoint(folder, tmp_path):
    run_cli(tmp_path / 'dino', f'data.root={folder}', 'trainer.epochs=1')
    path = tmp_path / 'dino' / 'checkpoints' / 'last.pth'
    saved = load(path)
    assert saved['meta']['num_classes'] == 0 and 'conv_cls_head.weight' not in saved['model']
    teacher = saved['state_dict_ema']
    model = timm.create_model('conformer_nano_patch4', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path)), base_channel=8,
                              embed_dim=16, num_heads=2, depth=6, patch_size=4)
    state = model.state_dict()
    for name, value in teacher.items():  # the teacher's backbone, as DINO releases
        assert torch.equal(state[name], value), name
    assert state['conv_cls_head.weight'].shape == (3, model.conv_features)  # new heads
    # and a supervised fine-tuning run takes it, with its architecture, from the file
    out = run_train(RUN + ['aug=none'], tmp_path / 'finetune', f'data.root={folder}',
                    'trainer.epochs=1', f'model.checkpoint={path}')
    assert 'val top-1' in out
    tuned = load(tmp_path / 'finetune' / 'checkpoints' / 'last.pth')
    assert tuned['meta']['model_kwargs']['patch_size'] == 4


def test_cosine_schedules_run_from_start_to_end():
    from conformer.engine.methods.dino import cosine
    assert cosine(0.996, 1., 0, 100) == 0.996 and cosine(0.996, 1., 100, 100) == 1.
    assert math.isclose(cosine(0.04, 0.4, 50, 100), 0.22)


@pytest.mark.slow
def test_on_real_images_centring_holds_the_spread_the_run_without_it_loses(tmp_path):
    """160 Fashion-MNIST images, 40 steps near DINO's learning rate for the batch (5e-5; its
    recipe gives 5e-4 x 16 / 256 = 3.1e-5): with centring the outputs' spread settles (about
    0.13); without, it keeps falling and the monitor stops the run. Needs the Fashion-MNIST
    files (dataset-fashion-mnist)."""
    real = ['data=fashion_mnist', 'data.download=false', 'data.input_size=28',
            'data.samples_per_class=16', 'data.batch_size=16', 'method.global_size=28',
            'method.local_size=12', 'optim.lr=5e-5', 'trainer.epochs=4', 'logging.every_steps=4',
            'trainer.eval_every=100', 'method.collapse_std=0.1', 'method.collapse_after=30']
    run_cli(tmp_path / 'dino', *real, monitor=True)
    spread = [r['std'] for r in load_jsonl(tmp_path / 'dino' / 'metrics.jsonl') if 'std' in r]
    assert len(spread) == 12 and min(spread[3:]) > 0.1, spread
    proc = run_cli(tmp_path / 'uncentred', *real, 'method.centering=false', monitor=True,
                   wait=False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and 'centring prevents this' in out, out


def test_a_folder_without_class_folders_pretrains_without_evaluation(tmp_path):
    """data.labelled=false: images at any depth, no labels, no eval split; k-NN is skipped
    before any feature is computed."""
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / 'images' / ('deeper' if i % 2 else '')
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f'{i}.png')
    out = run_cli(tmp_path / 'run', f'data.root={tmp_path / "images"}', 'data.labelled=false',
                  'trainer.epochs=1')
    assert 'no labels, no k-NN evaluation' in out
    saved = load(tmp_path / 'run' / 'checkpoints' / 'last.pth')
    assert saved['step'] == 1 and saved['sampler']['num_samples'] == 12
