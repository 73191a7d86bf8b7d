"""The Hydra tree composes, and the schema rejects typos and wrong types by key name."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from conformer.engine.cli import config_dir
from conformer.engine.config import check

CONFIGS = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / 'experiment').glob('*.yaml'))


def compose_train(*overrides, name='train'):
    with initialize_config_dir(str(CONFIGS), version_base='1.3'):
        return compose(name, overrides=list(overrides))


def test_config_dir_is_the_repository_tree():
    assert (CONFIGS / 'train.yaml').is_file() and (CONFIGS / 'experiment').is_dir()


def intended_world_size(experiment: str) -> int:
    """The process count the experiment's own launch command uses (its header comment)."""
    text = (CONFIGS / 'experiment' / f'{experiment}.yaml').read_text()
    found = re.search(r'--nproc_per_node[ =](\d+)', text)
    return int(found.group(1)) if found else 1


@pytest.mark.parametrize('experiment', EXPERIMENTS)
def test_every_experiment_composes_and_passes_the_checks_at_its_world_size(experiment):
    cfg = compose_train(f'experiment={experiment}', 'data.root=/data', 'model.checkpoint=/x.pth')
    check(cfg, world_size=intended_world_size(experiment))
    assert cfg.name == experiment


def test_imagenet_recipes_are_launched_on_8_gpus_and_keep_ema_under_ddp():
    for experiment in (e for e in EXPERIMENTS if e.startswith('imagenet_')):
        cfg = compose_train(f'experiment={experiment}', 'data.root=/data')
        assert intended_world_size(experiment) == 8
        assert cfg.trainer.ema and not cfg.trainer.fsdp


@pytest.mark.parametrize('overrides, world_size, message', [
    # 1024 over 8 GPUs is 128 per GPU; 1000 over 8 is 125: timm's Mixup asserts mid-run
    (['experiment=imagenet_conformer_tiny_patch16', 'data.batch_size=1000'], 8,
     'gives 125; make data.batch_size a multiple of 16'),
    (['aug.mixup=0.8', 'data.batch_size=12', 'trainer.accum_steps=2'], 2,
     'world size 2 x trainer.accum_steps=2 gives 3'),
    (['aug.mixup=0', 'aug.cutmix=1.0', 'data.batch_size=6'], 2, 'gives 3'),
    (['data.batch_size=12'], 8, 'not divisible by world size 8 x trainer.accum_steps=1'),
])
def test_a_batch_the_launch_cannot_split_fails_before_work(overrides, world_size, message):
    cfg = compose_train('data.root=/data', *overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        check(cfg, world_size=world_size)
    check(cfg, world_size=1)  # the same settings fit one process


def test_the_world_size_comes_from_the_launch(monkeypatch):
    cfg = compose_train('data.root=/data', 'aug.mixup=0.8', 'data.batch_size=6')
    check(cfg)  # one process: 6 images per step
    monkeypatch.setenv('WORLD_SIZE', '2')  # as torchrun sets it
    with pytest.raises(ValueError, match='gives 3'):
        check(cfg)
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.setenv('SLURM_PROCID', '0')  # as srun sets them
    monkeypatch.setenv('SLURM_NTASKS', '2')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', '29500')
    with pytest.raises(ValueError, match='gives 3'):
        check(cfg)


def test_every_group_option_composes():
    for group in ('model', 'data', 'aug', 'optim', 'sched', 'trainer', 'logging'):
        for option in (CONFIGS / group).glob('*.yaml'):
            check(compose_train(f'{group}={option.stem}', 'data.root=/data'))


def test_imagenet_recipes_follow_the_paper():
    cfg = compose_train('experiment=imagenet_conformer_small_patch16', 'data.root=/data')
    assert cfg.model.name == 'conformer_small_patch16'
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (1e-3, 1024, 0.05)
    assert (cfg.trainer.epochs, cfg.sched.warmup_epochs, cfg.sched.min_lr) == (300, 5, 1e-5)
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.label_smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.aug.re_prob, cfg.aug.repeated_aug, cfg.model.drop_path_rate) == (0.25, 3, 0.1)
    assert cfg.aug.auto_augment == 'rand-m9-mstd0.5-inc1' and cfg.trainer.ema_decay == 0.99996


def test_a_typo_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train('optim.lrr=0.1')
    assert 'lrr' in str(err.value) + str(err.value.__cause__)


def test_a_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train('optim.lr=fast')
    message = str(err.value) + str(err.value.__cause__)
    assert 'optim.lr' in message and 'fast' in message


def test_the_schema_also_guards_yaml_edits():
    cfg = compose_train()
    with pytest.raises(ConfigAttributeError, match='trainer.epoch'):
        cfg.trainer.epoch = 3  # the schema is in struct mode
    with pytest.raises(ValidationError, match='batch_size'):
        OmegaConf.merge(cfg, {'data': {'batch_size': 'many'}})


@pytest.mark.parametrize('overrides, message', [
    (['data=fashion_mnist', 'data.mean=[0.5,0.5]'], 'data.mean/data.std need 1 values'),
    (['data.batch_size=10', 'trainer.accum_steps=3'], 'not divisible by world size 1 x '
                                                       'trainer.accum_steps=3'),
    (['trainer.amp=fp8'], "trainer.amp='fp8'; choose one of"),
    (['model.freeze_backbone=true', 'optim.layer_decay=0.75'], 'drop optim.layer_decay'),
    (['trainer.fsdp=true', 'trainer.ema=true'], 'keep trainer.fsdp=false (DDP, as the '
                                                'ImageNet recipes do) to train with EMA'),
    (['model.name=conformer_small_patch8'], "model.name: unknown model 'conformer_small_patch8'"),
    # would fail only at the first evaluation, an epoch in, with nothing saved
    (['data.eval_batch_size=0'], 'data.eval_batch_size must be >= 1, got 0'),
    (['trainer.eval_every=0'], 'trainer.eval_every must be >= 1, got 0'),
    # would train on something else than asked, or fail deep inside
    (['data.samples_per_class=-1'], 'data.samples_per_class must be >= 1, got -1'),
    (['data.samples_per_class=0'], 'data.samples_per_class must be >= 1, got 0'),
    (['data.classes=[]'], 'data.classes=[]: list each class index once'),
    (['data.classes=[1,1]'], 'data.classes=[1, 1]: list each class index once'),
    (['optim.clip_grad=-1'], 'optim.clip_grad must be > 0, got -1.0'),
    (['optim.layer_decay=0'], 'optim.layer_decay must be in (0, 1], got 0.0'),
    (['optim.layer_decay=1.5'], 'optim.layer_decay must be in (0, 1], got 1.5'),
    (['optim.lr=0'], 'optim.lr must be > 0, got 0.0'),
    (['optim.name=adamx'], "optim.name='adamx' is not one of its"),
    (['sched.name=plateau'], "sched.name='plateau'; choose one of ['cosine'"),
    (['trainer.ema_decay=1'], 'trainer.ema_decay must be in [0, 1), got 1.0'),
    (['aug.hflip=1.5'], 'aug.hflip must be in [0, 1], got 1.5'),
    (['aug.re_prob=-0.1'], 'aug.re_prob must be in [0, 1], got -0.1'),
    (['aug.mixup_prob=2'], 'aug.mixup_prob must be in [0, 1], got 2.0'),
    (['aug.mixup=-1'], 'aug.mixup must be >= 0, got -1.0'),
    (['aug.cutmix=-1'], 'aug.cutmix must be >= 0, got -1.0'),
    (['aug.label_smoothing=1'], 'aug.label_smoothing must be in [0, 1), got 1.0'),
    (['trainer.max_steps=0'], 'trainer.max_steps must be >= 1, got 0'),
    (['trainer.ckpt_every_steps=0'], 'trainer.ckpt_every_steps must be >= 1, got 0'),
    (['trainer.threads=0'], 'trainer.threads must be >= 1, got 0'),
    (['logging.every_steps=0'], 'logging.every_steps must be >= 1, got 0'),
    (['data.num_workers=-1'], 'data.num_workers must be >= 0, got -1'),
    (['data.input_size=0'], 'data.input_size must be >= 1, got 0'),
    (['experiment=quickstart', 'data.input_size=7'],
     'data.input_size=7 is smaller than the patch size 8 of conformer_nano_patch4'),
    (['experiment=quickstart', 'model.patch_size=12'], 'model.* settings: Conformer: patch_size'),
    (['data.interpolation=foo'], "data.interpolation='foo'; choose one of ['bicubic'"),
    (['data.crop_pct=0'], 'data.crop_pct must be in (0, 1], got 0.0'),
    (['aug.scale=[0.5]'], 'aug.scale=[0.5] must be [min, max]'),
    (['aug.scale=[0.9,0.1]'], 'aug.scale=[0.9, 0.1] must be [min, max]'),
    (['aug.auto_augment=foo'], "aug.auto_augment='foo' with aug.train_crop=rrc: start it with"),
    (['aug=small', 'aug.auto_augment=augmix'], "train_crop=pad: start it with one of ['rand']"),
    (['data.std=[0.2,0,0.2]'], 'data.std=[0.2, 0.0, 0.2]: images are divided by it'),
])
def test_incompatible_settings_fail_before_work(overrides, message):
    cfg = compose_train(*overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        check(cfg)


@pytest.mark.parametrize('override', [
    'optim.name=lookahead_adamw', 'sched.name=step', 'optim.layer_decay=1.0', 'aug.hflip=1.0',
    'trainer.ema_decay=0', 'data.crop_pct=1.0', 'aug.auto_augment=augmix-m5-w4-d2',
    'aug.auto_augment=original', 'data.interpolation=bilinear', 'trainer.max_steps=1'])
def test_values_at_the_edge_of_their_range_pass(override):
    check(compose_train(override))


def test_eval_config_composes():
    cfg = compose_train('checkpoint=/x.pth', 'data=fashion_mnist', 'aug=small', name='eval')
    check(cfg)
    assert cfg.checkpoint == '/x.pth' and cfg.data.in_chans == 1
    with pytest.raises(ValueError, match="amp='bf61'; choose one of"):
        check(compose_train('amp=bf61', 'checkpoint=/x.pth', name='eval'))
    with pytest.raises(ValueError, match='threads must be >= 1'):
        check(compose_train('threads=0', 'checkpoint=/x.pth', name='eval'))


def test_eval_without_weights_is_refused_rather_than_scoring_random_ones():
    with pytest.raises(ValueError, match='no weights to evaluate.*checkpoint=.*model.pretrained'):
        check(compose_train(name='eval'))
    check(compose_train('model.pretrained=true', name='eval'))
    check(compose_train('model.checkpoint=/x.pth', name='eval'))
