"""End-to-end training on a tiny model and a tiny ImageFolder: outputs, exact resume after
SIGKILL, clean SIGTERM exit, NaN stop, transfer modes, Hydra multirun, DDP and FSDP2 over
gloo."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from conformer.engine.cli import config_dir
from conformer.engine.trainer import fused_update, train
from conformer.weights import CheckpointError

from helpers import REPO
from helpers.image_folders import make_folder
from helpers.train_runs import kill_and_resume, load, run_train, wait_for

TINY = ['model=conformer_nano_patch4',
        'model.base_channel=8', 'model.embed_dim=16', 'model.num_heads=2', 'model.depth=6',
        'model.drop_path_rate=0.1', 'data.input_size=16', 'data.eval_batch_size=16',
        'data.num_workers=0', 'data.batch_size=8', 'aug=small', 'aug.pad=2', 'aug.re_prob=0.5',
        'optim.lr=3e-3', 'trainer.threads=1', 'trainer.deterministic=true', 'trainer.ema=true',
        'trainer.ema_decay=0.9', 'logging.progress=false', 'logging.every_steps=2']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('images'))


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir(), version_base='1.3'):
        return compose('train', overrides=list(overrides))


def run_cli(run_dir, *overrides, **kw):
    return run_train(TINY, run_dir, *overrides, **kw)


def test_a_run_leaves_metrics_curves_and_a_portable_checkpoint(folder, tmp_path):
    cfg = compose_cfg(*TINY, f'data.root={folder}', 'trainer.epochs=2', 'trainer.keep_last=1')
    result = train(cfg, tmp_path)
    assert result['status'] == 'finished' and result['step'] == 8  # 36 images // 8, x2 epochs
    summary = json.loads((tmp_path / 'metrics.json').read_text())
    assert summary['top1'] == result['top1'] and summary['count'] == 18
    assert (tmp_path / 'curves.png').stat().st_size > 10_000
    kinds = [json.loads(line)['kind']
             for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert kinds.count('eval') == 2 and kinds.count('train') >= 4
    ckpts = tmp_path / 'checkpoints'
    assert sorted(p.name for p in ckpts.iterdir()) == ['best.pth', 'last.pth', 'step-00000008.pth']
    state = load(ckpts / 'last.pth')
    assert {'model', 'state_dict_ema', 'meta', 'optimizer', 'scheduler', 'scaler', 'rng',
            'sampler'} <= set(state)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in state['model'])
    assert state['meta']['variant'] == 'conformer_nano_patch4' and state['meta']['num_classes'] == 3
    # the weights rebuild the model; its summed-head accuracy on val is the recorded one
    from conformer.engine.evaluate import evaluate_checkpoint
    with initialize_config_dir(config_dir(), version_base='1.3'):
        eval_cfg = compose('eval', overrides=[
            *[o for o in TINY if o.split('=')[0].split('.')[0] in ('model', 'data', 'aug')],
            f'data.root={folder}', f'checkpoint={ckpts / "last.pth"}', 'use_ema=false'])
    assert evaluate_checkpoint(eval_cfg)['top1'] == pytest.approx(result['top1'])
    # predict, export and visualize rebuild the model from the file alone, with the eval
    # split's preprocessing
    from timm.data import create_transform, resolve_data_config

    from conformer.data.transforms import build_transform
    from conformer.predict import create_model, read_image
    rebuilt = create_model(checkpoint=str(ckpts / 'last.pth'))
    image = read_image(folder / 'val' / 'class1' / '0.png', rebuilt.in_chans)
    torch.testing.assert_close(create_transform(**resolve_data_config(model=rebuilt))(image),
                               build_transform(cfg.aug, cfg.data, is_training=False)(image))


def test_the_eval_tool_reports_the_same_accuracy_as_training(folder, tmp_path):
    run_cli(tmp_path / 'run', f'data.root={folder}', 'trainer.epochs=1')
    trained = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    out = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'eval.py'),
         *[o for o in TINY if o.split('=')[0].split('.')[0] in ('model', 'data', 'aug')],
         f'data.root={folder}', f'checkpoint={tmp_path / "run" / "checkpoints" / "best.pth"}',
         f'hydra.run.dir={tmp_path / "eval"}'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
    assert result['top1'] == pytest.approx(trained['ema_top1'])  # EMA weights by default
    assert f"top-1 {result['top1']:.2f}%" in out.stdout


@pytest.fixture(scope='module')
def short_run(folder, tmp_path_factory):
    """A run stopped at step 2 of its first epoch's 4, and its weights alone in weights.pth."""
    run_dir = tmp_path_factory.mktemp('short')
    train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=2'), run_dir)
    torch.save(load(run_dir / 'checkpoints' / 'last.pth')['model'], run_dir / 'weights.pth')
    return run_dir


def compose_eval(*overrides):
    with initialize_config_dir(config_dir(), version_base='1.3'):
        return compose('eval', overrides=[
            *[o for o in TINY if o.split('=')[0].split('.')[0] in ('model', 'data', 'aug')],
            *overrides])


def test_a_new_run_never_overwrites_an_earlier_one_and_resume_continues_it(folder, short_run,
                                                                         tmp_path):
    shutil.copytree(short_run, tmp_path / 'run')
    listing = sorted((tmp_path / 'run').rglob('*'))
    files = {p: p.read_bytes() for p in listing if p.is_file()}
    with pytest.raises(FileExistsError, match='already holds the checkpoints of an earlier run.*'
                                              'pass trainer.resume=auto'):
        train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=3'), tmp_path / 'run')
    assert sorted((tmp_path / 'run').rglob('*')) == listing
    assert {p: p.read_bytes() for p in files} == files
    result = train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=3',
                               'trainer.resume=auto'), tmp_path / 'run')
    assert result['step'] == 3 and result['status'] == 'finished'


@pytest.mark.parametrize('resume, overrides, error, message', [
    ('checkpoints/last.pth', ['data.batch_size=12'], ValueError,
     'saved with data.batch_size=8, but this run has data.batch_size=12.*resume with '
     'data.batch_size=8'),
    ('checkpoints/last.pth', ['data.batch_size=24'], ValueError, 'resume with data.batch_size=8'),
    ('checkpoints/last.pth', ['trainer.seed=1'], ValueError, 'resume with trainer.seed=0'),
    ('checkpoints/last.pth', ['data.samples_per_class=9'], ValueError,
     'saved training on 36 images, this run has 27: resume with the same data.root'),
    ('checkpoints/last.pth', ['model.embed_dim=32'], CheckpointError,
     r'trainer.resume=.*last.pth: the weights are for another Conformer variant.*\n.*cls_token'),
    ('checkpoints/last.pth', ['data.classes=[0,1]'], ValueError,
     'trainer.resume=.*last.pth was trained with num_classes=3, the configured data has 2'),
    ('weights.pth', [], ValueError, 'trainer.resume=.*weights.pth is not a checkpoint written by '
     "conformer-train \\(it lacks 'model', 'optimizer'.*use model.checkpoint=.*weights.pth "
     'instead'),
    # the saved optimizer state would override these: refused, never ignored
    ('checkpoints/last.pth', ['optim.lr=1e-3', 'optim.weight_decay=0.1'], ValueError,
     r'other optimizer settings.*optim.lr: 0.003 -> 0.001; optim.weight_decay: 0.05 -> 0.1\. '
     r'Resume with the saved values, or start a new run from its weights \(model.checkpoint='),
    ('checkpoints/last.pth', ['optim.name=sgd'], ValueError, 'optim.name: adamw -> sgd'),
])
def test_a_resume_that_cannot_continue_the_run_fails_before_training(folder, short_run, tmp_path,
                                                                     resume, overrides, error,
                                                                     message):
    cfg = compose_cfg(*TINY, f'data.root={folder}', f'trainer.resume={short_run / resume}',
                      *overrides)
    with pytest.raises(error, match=message):
        train(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize('checkpoint, overrides, error, message', [
    ('missing.pth', [], FileNotFoundError, r'checkpoint=.*missing.pth does not exist; pass '
                                           r'checkpoint=<path'),
    ('checkpoints', [], IsADirectoryError, 'checkpoint=.*checkpoints is a folder'),
    ('weights.pth', [], ValueError, 'use model.checkpoint=.*weights.pth instead'),
    ('checkpoints/last.pth', ['model.embed_dim=32'], CheckpointError,
     'checkpoint=.*last.pth: the weights are for another Conformer variant'),
    ('checkpoints/last.pth', ['data.classes=[0,1]'], ValueError,
     'checkpoint=.*last.pth was trained with num_classes=3, the configured data has 2'),
])
def test_eval_checkpoint_errors_name_evals_own_setting(folder, short_run, checkpoint, overrides,
                                                       error, message):
    from conformer.engine.evaluate import evaluate_checkpoint
    cfg = compose_eval(f'data.root={folder}', f'checkpoint={short_run / checkpoint}', *overrides)
    with pytest.raises(error, match=message) as err:
        evaluate_checkpoint(cfg)
    assert 'trainer.resume' not in str(err.value)


@pytest.fixture(scope='module')
def other_classes(folder, tmp_path_factory):
    """The same images under three other class names."""
    root = tmp_path_factory.mktemp('renamed')
    for split in ('train', 'val'):
        for c in range(3):
            shutil.copytree(folder / split / f'class{c}', root / split / f'kind{c}')
    return root


def test_resume_and_eval_refuse_data_with_other_class_names(short_run, other_classes, tmp_path):
    from conformer.engine.evaluate import evaluate_checkpoint
    names = r'trained on the classes \[class0, class1, class2\], the configured data has ' \
            r'\[kind0, kind1, kind2\]'
    last = short_run / 'checkpoints' / 'last.pth'
    with pytest.raises(ValueError, match=f'trainer.resume=.*last.pth was {names}'):
        train(compose_cfg(*TINY, f'data.root={other_classes}', f'trainer.resume={last}'),
              tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match=f'checkpoint=.*last.pth was {names}'):
        evaluate_checkpoint(compose_eval(f'data.root={other_classes}', f'checkpoint={last}'))


def test_resuming_a_finished_run_leaves_it_as_it_was(folder, short_run, tmp_path, caplog):
    shutil.copytree(short_run, tmp_path / 'run')
    files = {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()}
    summary = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert 'top1' in summary
    result = train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=2',
                               'trainer.resume=auto'), tmp_path / 'run')
    # the recorded results, with the files of the folder resumed (a copy of the one trained)
    moved = ('checkpoint', 'run_dir')
    assert {k: v for k, v in result.items() if k not in moved} == \
        {k: v for k, v in summary.items() if k not in moved}
    assert result['run_dir'] == str(tmp_path / 'run')
    assert Path(result['checkpoint']).parent == tmp_path / 'run' / 'checkpoints'
    assert {p: p.read_bytes() for p in (tmp_path / 'run').rglob('*') if p.is_file()} == files
    assert 'finished at step 2: nothing to train, nothing changed' in caplog.text


def test_a_resume_with_a_new_schedule_follows_it_from_the_saved_step(folder, short_run, tmp_path,
                                                                     caplog):
    shutil.copytree(short_run, tmp_path / 'run')
    longer = [*TINY, f'data.root={folder}', 'trainer.max_steps=3', 'trainer.epochs=20',
              'sched.min_lr=0.0']
    train(compose_cfg(*longer, 'trainer.resume=auto'), tmp_path / 'run')
    assert 'new learning-rate schedule (trainer.epochs: 10 -> 20; sched.min_lr: 1e-05 -> 0.0)' \
        in caplog.text
    train(compose_cfg(*longer), tmp_path / 'fresh')  # configured so from the start
    resumed, fresh = (load(tmp_path / run / 'checkpoints' / 'last.pth') for run in ('run', 'fresh'))
    assert resumed['scheduler'] == fresh['scheduler']
    lr = [s['optimizer']['param_groups'][0]['lr'] for s in (resumed, fresh)]
    assert lr[0] == lr[1]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from conformer.engine.trainer import own_run_folder
with own_run_folder(Path(sys.argv[1])):
    print('holding', flush=True)
    time.sleep(600)
"""


def test_a_run_folder_belongs_to_one_process_at_a_time(folder, tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'holding\n'
        cfg = compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=1')
        with pytest.raises(OSError, match=f'{tmp_path} is in use by another training run '
                                          f'\\(PID {holder.pid}\\); wait for it'):
            train(cfg, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ['run.lock']  # nothing written
    finally:
        holder.kill()  # SIGKILL: the lock dies with its process
        holder.wait()
    assert train(cfg, tmp_path)['step'] == 1
    assert not (tmp_path / 'run.lock').exists()


def test_ema_weights_are_where_timm_finds_them_and_old_files_still_read(folder, short_run,
                                                                       tmp_path):
    from conformer.engine.evaluate import evaluate_checkpoint
    last = short_run / 'checkpoints' / 'last.pth'
    state = load(last)
    model = timm.create_model('conformer_nano_patch4', num_classes=3, base_channel=8, embed_dim=16,
                              num_heads=2, depth=6)
    for use_ema, key in ((True, 'state_dict_ema'), (False, 'model')):
        timm.models.load_checkpoint(model, str(last), use_ema=use_ema)
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[key][name]), (key, name)
    assert not torch.equal(state['model']['conv1.weight'], state['state_dict_ema']['conv1.weight'])
    # checkpoints written before kept their EMA weights under 'ema': still evaluated as EMA
    old = dict(state, ema=state['state_dict_ema'])
    del old['state_dict_ema']
    torch.save(old, tmp_path / 'old.pth')
    results = [evaluate_checkpoint(compose_eval(f'data.root={folder}', f'checkpoint={path}'))
               for path in (last, tmp_path / 'old.pth')]
    assert results[0]['loss'] == results[1]['loss']
    plain = evaluate_checkpoint(compose_eval(f'data.root={folder}', f'checkpoint={last}',
                                             'use_ema=false'))
    assert plain['loss'] != results[0]['loss']


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    from conformer.engine.build import set_threads
    assert compose_cfg('experiment=quickstart').trainer.threads is None  # no pinned count
    before = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
    try:
        set_threads(None)
        assert torch.get_num_threads() == 3
        set_threads(1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv('OMP_NUM_THREADS', '2')  # the launcher's choice is kept
        set_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_training_on_shared_cores_warns_once(folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(time, 'process_time', lambda: 0.0)  # the process gets no CPU time
    before = torch.get_num_threads()
    try:
        train(compose_cfg(*[o for o in TINY if not o.startswith('trainer.threads')],
                          'trainer.threads=2', f'data.root={folder}', 'trainer.epochs=2'), tmp_path)
    finally:
        torch.set_num_threads(before)
    assert caplog.text.count('training ran 2 threads but got 0.0 cores of CPU time: the cores '
                             'are shared') == 1
    assert 'trainer.threads=1 is often faster' in caplog.text


def compose_as_typed(config, *overrides):
    """A config as the command line gives it, with Hydra's record of what was typed."""
    with initialize_config_dir(config_dir(), version_base='1.3'):
        return compose(config, overrides=list(overrides), return_hydra_config=True)


def test_eval_takes_model_preprocessing_and_classes_from_the_checkpoint(short_run, tmp_path,
                                                                        caplog):
    from conformer.engine.evaluate import evaluate_checkpoint
    last = short_run / 'checkpoints' / 'last.pth'
    trained = json.loads((short_run / 'metrics.json').read_text())
    # the data has a fourth class: the three the model was trained on are evaluated
    four = make_folder(tmp_path / 'four', classes=4)
    cfg = compose_as_typed('eval', f'data.root={four}', 'aug=small', 'data.num_workers=0',
                           f'checkpoint={last}')
    result = evaluate_checkpoint(cfg)
    assert result['top1'] == pytest.approx(trained['ema_top1'])
    assert result['classes'] == ['class0', 'class1', 'class2'] and result['count'] == 18
    assert cfg.model.name == 'conformer_nano_patch4' and cfg.model.embed_dim == 16
    assert cfg.data.input_size == 16
    # what is typed wins; a value that differs from the record is named
    cfg = compose_as_typed('eval', f'data.root={four}', 'aug=small', 'data.num_workers=0',
                           f'checkpoint={last}', 'data.input_size=20')
    evaluate_checkpoint(cfg)
    assert cfg.data.input_size == 20
    assert f'data.input_size=20 is not what checkpoint={last} was trained with (16); kept' \
        in caplog.text


def test_finetuning_takes_the_architecture_from_model_checkpoint(short_run, tmp_path):
    two_classes = make_folder(tmp_path / 'two', classes=2)
    last = short_run / 'checkpoints' / 'last.pth'
    cfg = compose_as_typed('train', f'data.root={two_classes}', f'model.checkpoint={last}',
                           'aug=small', 'data.batch_size=8', 'data.num_workers=0',
                           'trainer.max_steps=1', 'trainer.threads=1', 'logging.progress=false')
    train(cfg, tmp_path / 'run')
    meta = load(tmp_path / 'run' / 'checkpoints' / 'last.pth')['meta']
    recorded = load(last)['meta']
    assert meta['variant'] == recorded['variant'] == 'conformer_nano_patch4'
    assert meta['model_kwargs'] == recorded['model_kwargs'] and meta['input_size'] == 16
    assert meta['classes'] == ['class0', 'class1']


def test_the_loss_is_the_mean_of_both_heads_cross_entropies():
    from conformer.engine import dual_head_loss
    conv, trans = torch.randn(4, 5), torch.randn(4, 5)
    target = torch.tensor([0, 4, 2, 2])

    def nll(logits):  # hand-written cross-entropy
        return (logits.exp().sum(1).log() - logits[torch.arange(4), target]).mean()

    expected = (nll(conv) + nll(trans)) / 2
    loss = dual_head_loss((conv, trans), target, torch.nn.CrossEntropyLoss())
    assert torch.allclose(loss, expected)


def assert_same_state(a, b):
    for key in ('model', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'
    flat = lambda s: [t for st in s['optimizer']['state'].values() for t in st.values()  # noqa
                      if isinstance(t, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b)))


def test_a_run_killed_with_sigkill_resumes_to_bitwise_identical_weights(folder, tmp_path):
    common = [f'data.root={folder}', 'trainer.epochs=3', 'trainer.ckpt_every_steps=1',
              'aug.mixup=0.4']
    run_cli(tmp_path / 'whole', *common)
    out = kill_and_resume(run_cli, tmp_path / 'killed', *common, kill_at=6, total=12)  # epoch 2
    assert 'val top-1' in out
    assert_same_state(load(tmp_path / 'whole' / 'checkpoints' / 'last.pth'),
                      load(tmp_path / 'killed' / 'checkpoints' / 'last.pth'))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(folder, tmp_path):
    proc = run_cli(tmp_path, f'data.root={folder}', 'trainer.epochs=50',
                   'trainer.ckpt_every_steps=2', wait=False)
    wait_for(tmp_path / 'checkpoints' / 'step-00000002.pth', proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert 'run interrupted' in out
    state = load(tmp_path / 'checkpoints' / 'last.pth')
    assert state['step'] >= 2
    assert json.loads((tmp_path / 'metrics.json').read_text())['status'] == 'interrupted'


def test_a_stop_request_at_the_last_step_still_finishes_the_run(folder, tmp_path, monkeypatch):
    """Else its final evaluation would never run: a resume finds nothing left to train."""
    from conformer.engine import trainer
    requested = trainer.StopRequested.__init__

    def requested_at_once(self):
        requested(self)
        self.signal = signal.SIGTERM

    monkeypatch.setattr(trainer.StopRequested, '__init__', requested_at_once)
    result = train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.max_steps=1'), tmp_path)
    assert result['status'] == 'finished' and result['count'] == 18


def test_a_diverging_run_stops_and_names_only_a_checkpoint_saved_before(folder, tmp_path):
    cfg = compose_cfg(*TINY, f'data.root={folder}', 'optim.lr=1e12', 'trainer.amp=none',
                      'trainer.ckpt_every_steps=1', 'trainer.epochs=5', 'trainer.keep_last=50')
    with pytest.raises(FloatingPointError, match='became .* by epoch 0 step .*; stopped without '
                                                 'saving. Latest checkpoint, saved before that: '
                                                 '.*step-0') as err:
        train(cfg, tmp_path)
    named = Path(str(err.value).split('saved before that: ')[1].split('. ')[0])
    # every checkpoint on disk, the one named included, holds finite weights
    assert named in (tmp_path / 'checkpoints').glob('step-*.pth')
    for path in (tmp_path / 'checkpoints').glob('*.pth'):
        for key in ('model', 'state_dict_ema'):
            assert all(torch.isfinite(t).all() for t in load(path)[key].values()
                       if t.is_floating_point()), path


def test_linear_probe_trains_only_the_heads_and_finetune_makes_a_new_head(folder, tmp_path):
    train(compose_cfg(*TINY, f'data.root={folder}', 'trainer.epochs=1'), tmp_path / 'pre')
    # conformer.weights loads a training checkpoint's EMA weights when it has them
    pretrained = load(tmp_path / 'pre' / 'checkpoints' / 'last.pth')['state_dict_ema']
    two_classes = make_folder(tmp_path / 'two', classes=2)
    probe = tmp_path / 'probe'
    train(compose_cfg(*TINY, f'data.root={two_classes}', 'trainer.epochs=1',
                      f'model.checkpoint={tmp_path / "pre" / "checkpoints" / "last.pth"}',
                      'model.freeze_backbone=true'), probe)
    probed = load(probe / 'checkpoints' / 'last.pth')['model']
    for name, value in probed.items():
        if name.startswith(('conv_cls_head', 'trans_cls_head')):
            assert value.shape[0] == 2
        else:  # weights and BN statistics untouched
            assert torch.equal(value, pretrained[name]), name
    head = probed['trans_cls_head.weight']
    assert not torch.equal(head, torch.zeros_like(head))


def test_layer_decay_gives_early_blocks_smaller_learning_rates(folder):
    from timm.optim import create_optimizer_v2
    model = timm.create_model('conformer_nano_patch4', num_classes=3, base_channel=8, embed_dim=16,
                              num_heads=2, depth=6)
    opt = create_optimizer_v2(model, 'adamw', lr=1.0, layer_decay=0.5)
    scales = {}
    for group in opt.param_groups:
        for p in group['params']:
            scales[p] = group['lr_scale']
    named = dict(model.named_parameters())
    ordered = ('conv1.weight', 'conv_trans_2.cnn_block.conv1.weight',
               'conv_trans_6.cnn_block.conv1.weight', 'conv_cls_head.weight')
    lrs = [scales[named[name]] for name in ordered]
    assert lrs == sorted(set(lrs)) and lrs[-1] == 1.0


def test_a_hydra_multirun_sweep_runs_every_job(folder, tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), '-m', *TINY, f'data.root={folder}',
         'trainer.max_steps=2', 'optim.lr=1e-3,2e-3', f'hydra.sweep.dir={tmp_path}'],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout + out.stderr
    for job in ('0', '1'):
        metrics = json.loads((tmp_path / job / 'metrics.json').read_text())
        assert metrics['step'] == 2
    lrs = [load(tmp_path / j / 'checkpoints' / 'last.pth')['config']['optim']['lr'] for j in '01']
    assert lrs == [1e-3, 2e-3]


def test_two_gloo_processes_match_one_process_and_resume_on_another_world_size(folder, tmp_path):
    # same global batch (8) and micro-batch (4): 2 ranks x 1 vs 1 rank x 2 accumulation steps,
    # with the gradients all-reduced (DDP) or reduce-scattered onto sharded weights (FSDP2).
    # SGD, as AdamW's first steps are about lr * sign(grad): the last-bit differences of the
    # reductions would become lr-sized steps on gradients that are zero in exact arithmetic
    # (the bias of a convolution before BatchNorm)
    common = [f'data.root={folder}', 'trainer.epochs=1', 'trainer.ema=false',
              'model.drop_path_rate=0.0', 'aug.re_prob=0.0', 'optim=sgd', 'optim.lr=0.01']
    two_procs = (sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node=2')
    run_cli(tmp_path / 'one', *common, 'trainer.accum_steps=2')
    run_cli(tmp_path / 'ddp', *common, launcher=two_procs)
    out = run_cli(tmp_path / 'fsdp', *common, 'trainer.fsdp=true', launcher=two_procs)
    assert out.count('of the last checkpoint') == 1  # rank 0 alone reports
    one = load(tmp_path / 'one' / 'checkpoints' / 'last.pth')
    params = dict(timm.create_model('conformer_nano_patch4', num_classes=3, base_channel=8,
                                    embed_dim=16, num_heads=2, depth=6).named_parameters())
    for run in ('ddp', 'fsdp'):
        two = load(tmp_path / run / 'checkpoints' / 'last.pth')
        assert two['world_size'] == 2 and one['step'] == two['step'] == 4
        assert set(two['model']) == set(one['model'])  # full, unsharded state dicts
        for name in params:
            torch.testing.assert_close(two['model'][name], one['model'][name],
                                       rtol=1e-4, atol=1e-5, msg=f'{run}: {name}')
    more = [c.replace('epochs=1', 'epochs=2') for c in common]
    # a 2-process checkpoint resumes in one process; a 1-process one resumes sharded on two
    out = run_cli(tmp_path / 'ddp', *more, 'trainer.resume=auto')
    assert 'val top-1' in out
    assert load(tmp_path / 'ddp' / 'checkpoints' / 'last.pth')['step'] == 8
    run_cli(tmp_path / 'one', *more, 'trainer.resume=auto', 'trainer.fsdp=true',
            launcher=two_procs)
    resumed = load(tmp_path / 'one' / 'checkpoints' / 'last.pth')
    assert resumed['step'] == 8 and resumed['world_size'] == 2


@pytest.mark.slow
def test_the_quickstart_learns_real_fashion_mnist(tmp_path):
    """The README's main job, cut to 40 steps: real data through the shipped experiment."""
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'train.py'), 'experiment=quickstart',
         'trainer.max_steps=40', 'logging.progress=false', f'hydra.run.dir={tmp_path}'],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / 'metrics.json').read_text())
    assert summary['count'] == 10_000 and summary['step'] == 40
    assert summary['top1'] > 30, summary  # chance is 10%
    assert f"test top-1 {summary['top1']:.2f}%" in proc.stdout
    assert (tmp_path / 'curves.png').is_file() and (tmp_path / 'checkpoints' / 'last.pth').is_file()


def test_adam_adamw_and_sgd_take_torchs_fused_update_and_match_its_reference_step():
    """One fused call updates every parameter (off the GPU torch's default is a Python loop);
    other optimizers and FSDP's sharded parameters keep their default."""
    cpu = torch.device('cpu')
    for name in ('adam', 'adamw', 'sgd', 'lookahead_adamw'):
        assert fused_update(name, cpu, fsdp=False) == {'fused': True}, name
    assert fused_update('lamb', cpu, fsdp=False) == {}
    assert fused_update('adamw', cpu, fsdp=True) == {}
    assert fused_update('adamw', torch.device('meta'), fsdp=False) == {}
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    for net, kwargs in ((model, fused_update('adamw', cpu, fsdp=False)),
                        (reference, dict(foreach=False))):
        optimizer = timm.optim.create_optimizer_v2(net, opt='adamw', lr=0.1, weight_decay=0.05,
                                                   **kwargs)
        for step in range(3):
            net(torch.ones(2, 5) * step).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)
