"""The Hydra tree composes, and the schema rejects typos and wrong types by key name."""
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


@pytest.mark.parametrize('experiment', EXPERIMENTS)
def test_every_experiment_composes_and_passes_the_checks(experiment):
    cfg = compose_train(f'experiment={experiment}', 'data.root=/data', 'model.checkpoint=/x.pth')
    check(cfg)
    assert cfg.name == experiment


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
        cfg.trainer.epoch = 3  # noqa: the schema is in struct mode
    with pytest.raises(ValidationError, match='batch_size'):
        OmegaConf.merge(cfg, {'data': {'batch_size': 'many'}})


@pytest.mark.parametrize('overrides, message', [
    (['data=fashion_mnist', 'data.mean=[0.5,0.5]'], 'data.mean/data.std need 1 values'),
    (['data.batch_size=10', 'trainer.accum_steps=3'], 'not divisible by trainer.accum_steps'),
    (['trainer.amp=fp8'], "trainer.amp='fp8'; choose one of"),
    (['model.freeze_backbone=true', 'optim.layer_decay=0.75'], 'drop optim.layer_decay'),
    (['trainer.fsdp=true', 'trainer.ema=true'], 'set trainer.ema=false'),
    (['model.name=conformer_small_patch8'], "model.name: unknown model 'conformer_small_patch8'"),
])
def test_incompatible_settings_fail_before_work(overrides, message):
    cfg = compose_train(*overrides)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
        check(cfg)


def test_eval_config_composes():
    cfg = compose_train('checkpoint=/x.pth', 'data=fashion_mnist', 'aug=small', name='eval')
    check(cfg)
    assert cfg.checkpoint == '/x.pth' and cfg.data.in_chans == 1
    with pytest.raises(ValueError, match="amp='bf61'; choose one of"):
        check(compose_train('amp=bf61', name='eval'))
