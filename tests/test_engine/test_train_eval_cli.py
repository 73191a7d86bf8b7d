"""conformer-train and conformer-eval end an expected error with one line on stderr and exit
status 1 (2 for usage errors), without a traceback; a refused run leaves the run it found in
its folder as it was; unusable run folders are named with the fix."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from helpers.image_folders import make_folder

TINY = {  # a small model and data settings each tool takes
    'eval': ['model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
             'model.num_heads=2', 'model.depth=6', 'data.input_size=16', 'data.num_workers=0',
             'aug=small'],
}
TINY['train'] = TINY['eval'] + ['data.batch_size=8', 'trainer.threads=1',
                                'logging.progress=false']


def run_tool(tool, *args, cwd, env=None, launcher=()):
    return subprocess.run(
        [*launcher, sys.executable, str(REPO / 'tools' / f'{tool}.py'), *TINY[tool], *args],
        cwd=cwd, text=True, capture_output=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))


def assert_reported(result, prog, status, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert 'Traceback' not in result.stderr and 'HYDRA_FULL_ERROR' not in result.stderr
    assert lines[-1].startswith(f'{prog}: error: ') and message in lines[-1], result.stderr


@pytest.fixture
def files(tmp_path):
    """A file, a checkpoint that is not one, and a run folder holding an earlier run."""
    (tmp_path / 'a_file').write_text('not a folder')
    (tmp_path / 'garbage.pth').write_bytes(b'\x00not a checkpoint' * 10)
    earlier = tmp_path / 'earlier'
    (earlier / 'checkpoints').mkdir(parents=True)
    torch.save({'model': {}}, earlier / 'checkpoints' / 'last.pth')
    return tmp_path


CASES = [  # tool, arguments ({t}: the test's folder), exit status, part of the message
    ('train', ['optim.lrr=1'], 2, "Could not override 'optim.lrr': Key 'lrr' not in"),
    ('train', ['optim.lr=['], 2, "no viable alternative at input '['"),
    ('train', ['model=nope'], 2, "Could not find 'model/nope'"),
    ('train', ['optim.lr=0'], 1, 'config error: optim.lr must be > 0, got 0.0'),
    ('train', ['trainer.device=cuda'], 1, 'trainer.device=cuda but no CUDA GPU is visible'),
    ('train', ['data.root={t}/missing'], 1, '{t}/missing/train does not exist'),
    ('train', ['trainer.resume={t}/missing.pth'], 1, 'trainer.resume={t}/missing.pth does not'),
    ('train', ['model.checkpoint={t}/missing.pth'], 1,
     'model.checkpoint={t}/missing.pth does not exist'),
    ('train', ['trainer.resume={t}'], 1, 'is a folder; pass a .pth file'),
    ('train', ['trainer.resume={t}/garbage.pth'], 1, 'cannot read trainer.resume={t}/garbage'),
    ('train', ['hydra.run.dir={t}/earlier'], 1, 'already holds the checkpoints of an earlier'),
    ('train', ['hydra.run.dir={t}/a_file'], 1, 'hydra.run.dir={t}/a_file is a file; choose a'),
    ('eval', [], 1, 'no weights to evaluate'),
    ('eval', ['device=cuda', 'model.checkpoint={t}/garbage.pth'], 1,
     'device=cuda but no CUDA GPU is visible; use device=cpu'),
    ('eval', ['checkpoint={t}/garbage.pth'], 1, 'cannot read checkpoint={t}/garbage.pth'),
    ('eval', ['chekpoint={t}/garbage.pth'], 2, "Key 'chekpoint' not in 'EvalConfig'"),
]


@pytest.mark.parametrize('tool, args, status, message', CASES,
                         ids=[f'{c[0]}-{" ".join(c[1])}' for c in CASES])
def test_expected_errors_end_with_one_line_and_a_status(files, tool, args, status, message):
    args = [a.format(t=files) for a in args]
    if not any(a.startswith('hydra.run.dir=') for a in args):
        args.append(f'hydra.run.dir={files}/run')
    result = run_tool(tool, 'data.root=/nowhere', *args, cwd=files)
    assert_reported(result, f'conformer-{tool}', status, message.format(t=files))


LAUNCH_CASES = [  # launcher variables, part of the message
    (dict(SLURM_PROCID='1', SLURM_NTASKS='1'), 'SLURM_PROCID=1 with SLURM_NTASKS=1'),
    (dict(SLURM_PROCID='0', SLURM_NTASKS='abc'), "SLURM_NTASKS='abc' is not an integer"),
    (dict(SLURM_PROCID='0', SLURM_NTASKS='2', SLURM_NODELIST='localhost',
          CONFORMER_RENDEZVOUS_TIMEOUT='1'), 'rank 0 of 2: the other ranks did not join'),
]


@pytest.mark.parametrize('tool', ['train', 'eval'])
@pytest.mark.parametrize('variables, message', LAUNCH_CASES,
                         ids=[' '.join(c[0]) for c in LAUNCH_CASES])
def test_wrong_launcher_variables_end_with_one_line_before_any_work(tmp_path, tool, variables,
                                                                     message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'WORLD_SIZE',
                                                                     'RANK', 'LOCAL_RANK'))}
    # the default run folder is named by the launch time, which the ranks agree on first
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools' / f'{tool}.py'), *TINY[tool], 'data.root=/nowhere',
         'checkpoint=none.pth' if tool == 'eval' else 'name=run'], cwd=tmp_path, text=True,
        capture_output=True, timeout=300,
        env=dict(env, OMP_NUM_THREADS='1', SLURM_JOB_ID=str(os.getpid() % 20000), **variables))
    assert_reported(result, f'conformer-{tool}', 1, message)
    assert not (tmp_path / 'outputs').exists()  # nothing was started


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = run_tool('train', 'optim.lr=0', f'hydra.run.dir={tmp_path}/run',
                      cwd=tmp_path, env={'HYDRA_FULL_ERROR': '1'})
    assert result.returncode == 1
    assert 'Traceback' in result.stderr and 'optim.lr must be > 0' in result.stderr


def test_a_refused_run_leaves_the_earlier_runs_record_as_it_was(files):
    earlier = files / 'earlier'
    records = earlier / '.hydra'
    records.mkdir()
    for name in ('config.yaml', 'hydra.yaml', 'overrides.yaml'):
        (records / name).write_text(f"the earlier run's {name}\n")
    before = {p.name: p.read_bytes() for p in records.iterdir()}
    result = run_tool('train', 'optim.lr=0.5', f'hydra.run.dir={earlier}', cwd=files)
    assert_reported(result, 'conformer-train', 1, 'already holds the checkpoints')
    assert {p.name: p.read_bytes() for p in records.iterdir()} == before
    assert earlier.is_dir()


@pytest.mark.parametrize('args', [['optim.lr=0'], ['data.root={t}/missing']])
def test_a_run_refused_before_training_leaves_no_folder_behind(tmp_path, args):
    """Hydra's record and log of a run that never started are removed with the folder the
    attempt made; an existing folder is left as it was (test above)."""
    args = [a.format(t=tmp_path) for a in args]
    result = run_tool('train', *args, f'hydra.run.dir={tmp_path}/new/run', cwd=tmp_path)
    assert_reported(result, 'conformer-train', 1, '')
    assert not (tmp_path / 'new' / 'run').exists()
    result = run_tool('train', *args, cwd=tmp_path)  # the default, dated folder
    assert result.returncode == 1
    assert not list((tmp_path / 'outputs' / 'train').iterdir())


def without_root_privileges():
    """A launcher that drops root's right to write anywhere (CAP_DAC_OVERRIDE), so that a
    read-only folder is read-only for the tool too; none is needed for other users."""
    if os.geteuid() != 0:
        return ()
    if shutil.which('setpriv') is None:
        pytest.skip('running as root without setpriv (util-linux) to drop CAP_DAC_OVERRIDE')
    drop = '-dac_override,-dac_read_search'
    return ('setpriv', f'--bounding-set={drop}', f'--inh-caps={drop}')


def test_a_read_only_run_folder_is_named_with_the_fix(tmp_path):
    run_dir = tmp_path / 'ro'
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        result = run_tool('train', f'hydra.run.dir={run_dir}', cwd=tmp_path,
                          launcher=without_root_privileges())
    finally:
        run_dir.chmod(0o755)
    assert_reported(result, 'conformer-train', 1,
                    f'cannot write to {run_dir} (read-only): choose a writable hydra.run.dir')


def test_a_finished_run_copied_elsewhere_reports_its_own_files(tmp_path):
    images = make_folder(tmp_path / 'images', per_class=4)
    args = [f'data.root={images}', 'trainer.max_steps=2', 'trainer.device=cpu',
            'logging.plot=false']
    first = run_tool('train', *args, f'hydra.run.dir={tmp_path}/first', cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert 'curves.png' not in first.stdout  # logging.plot=false draws none
    assert 'epoch 0 step 1: val top-1' in first.stdout  # the split as configured
    shutil.copytree(tmp_path / 'first', tmp_path / 'copy')
    again = run_tool('train', *args, 'trainer.resume=auto', f'hydra.run.dir={tmp_path}/copy',
                     cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert 'nothing to train' in again.stdout + again.stderr
    line = again.stdout.strip().splitlines()[-1]
    assert line.startswith('val top-1') and f'{tmp_path}/copy/checkpoints/' in line
    assert f'{tmp_path}/first' not in line


@pytest.mark.parametrize('workers', [0, 1])
def test_a_class_folder_whose_images_all_fail_to_decode_is_one_line(tmp_path, workers):
    """Headers pass the listing, pixels fail at loading, in the process or in a worker."""
    make_folder(tmp_path / 'data')
    for image in (tmp_path / 'data' / 'train' / 'class1').iterdir():
        image.write_bytes(image.read_bytes()[:100])  # cut after the header
    result = run_tool('train', f'data.root={tmp_path / "data"}', f'data.num_workers={workers}',
                      f'hydra.run.dir={tmp_path / "run"}', cwd=tmp_path)
    folder = tmp_path / 'data' / 'train' / 'class1'
    assert_reported(result, 'conformer-train', 1, f'class folder {folder} holds no readable image')
