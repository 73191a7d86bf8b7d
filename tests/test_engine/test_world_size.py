"""The same stream at any world size: a run killed with SIGKILL and resumed on another number of
processes (4 -> 3 -> 2, gloo on CPU, another data.num_workers in between) feeds, step by step,
exactly the global (sample, augmentation seed) list of an uninterrupted one-process run.

What each rank loads is recorded from outside the trainer: a wrapper script patches
`SeededTransform.__getitems__` (every training image passes through it with its key) before
running tools/train.py, and appends each micro-batch's keys to a file per rank."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import torch

from helpers import REPO
from helpers.image_folders import make_folder

RECORDER = """
import json, os, runpy, sys, time
from conformer.data import sampler
load = sampler.SeededTransform.__getitems__

def recording(self, keys):
    trained = [list(key) for key in keys if isinstance(key, tuple)]  # eval keys are plain
    if trained:
        rank = os.environ.get('RANK', '0')
        with open(os.path.join(os.environ['RECORD'], f'rank{rank}.jsonl'), 'a') as f:
            f.write(json.dumps(trained) + '\\n')
        time.sleep(float(os.environ.get('LOAD_DELAY', '0')))  # time to kill mid-run
    return load(self, keys)

sampler.SeededTransform.__getitems__ = recording
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
GLOBAL_BATCH, REPEATS, EPOCHS, IMAGES = 12, 3, 3, 36
STEPS = EPOCHS * IMAGES // GLOBAL_BATCH
RUN = ['model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
       'model.num_heads=2', 'model.depth=6', 'data.input_size=16', 'data.eval_batch_size=18',
       f'data.batch_size={GLOBAL_BATCH}', 'aug=small', 'aug.re_prob=0.5',
       f'aug.repeated_aug={REPEATS}', f'trainer.epochs={EPOCHS}', 'trainer.ckpt_every_steps=1',
       'trainer.threads=1', 'trainer.device=cpu', 'logging.progress=false']


def launch(tmp_path, run_dir, record, processes, *overrides, delay=0.0):
    record.mkdir()
    launcher = [sys.executable, str(tmp_path / 'recorder.py')]
    if processes > 1:
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    f'--nproc_per_node={processes}', str(tmp_path / 'recorder.py')]
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', RECORD=str(record), LOAD_DELAY=str(delay))
    return subprocess.Popen(
        [*launcher, str(REPO / 'tools' / 'train.py'), *RUN, f'hydra.run.dir={run_dir}',
         *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)  # its own process group: SIGKILL reaches every rank at once


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def kill_after(proc, checkpoint):
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, 'no checkpoint in 300 s'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def saved_step(run_dir):
    state = torch.load(run_dir / 'checkpoints' / 'last.pth', map_location='cpu',
                       weights_only=True)
    return state['step']


def rank_batches(record, processes):
    """Each rank's micro-batches in load order: [[(index, seed), ...], ...] per rank."""
    return [[[tuple(key) for key in json.loads(line)]
             for line in (record / f'rank{rank}.jsonl').read_text().splitlines()]
            for rank in range(processes)]


def global_steps(batches, steps):
    """Global batch of each of the first `steps` steps: rank r's slice is the r-th part."""
    return [sum((rank[step] for rank in batches), []) for step in range(steps)]


def test_a_run_killed_and_resumed_at_other_world_sizes_feeds_the_one_process_stream(tmp_path):
    folder = make_folder(tmp_path / 'images')  # 3 classes x 12 train images
    (tmp_path / 'recorder.py').write_text(RECORDER)
    data = [f'data.root={folder}']
    finish(launch(tmp_path, tmp_path / 'one', tmp_path / 'rec-one', 1, *data,
                  'data.num_workers=0'))
    one = rank_batches(tmp_path / 'rec-one', 1)[0]
    assert len(one) == STEPS and all(len(batch) == GLOBAL_BATCH for batch in one)

    run = tmp_path / 'resumed'
    stream = []
    phases = [(4, 'data.num_workers=0', 2), (3, 'data.num_workers=1', 5),
              (2, 'data.num_workers=0', None)]
    start = 0
    for number, (processes, workers, kill_at) in enumerate(phases):
        record = tmp_path / f'rec-{number}'
        resume = ['trainer.resume=auto'] if number else []
        proc = launch(tmp_path, run, record, processes, *data, workers, *resume,
                      delay=0.3 if kill_at else 0.0)
        if kill_at is None:
            finish(proc)
            end = STEPS
        else:
            kill_after(proc, run / 'checkpoints' / f'step-{kill_at:08d}.pth')
            end = saved_step(run)
            assert start < end < STEPS, 'killed too late: the test proved nothing'
        batches = rank_batches(record, processes)
        # every rank took the same steps, each a share of the global batch
        if kill_at is None:
            assert {len(rank) for rank in batches} == {end - start}
        assert all(len(b) == GLOBAL_BATCH // processes for rank in batches
                   for b in rank[:end - start])
        stream += global_steps(batches, end - start)
        start = end
    assert start == STEPS
    assert stream == one  # the same images with the same augmentation seeds, step by step
    per_epoch = STEPS // EPOCHS
    for epoch in range(EPOCHS):
        keys = sum(stream[epoch * per_epoch:(epoch + 1) * per_epoch], [])
        counts = Counter(index for index, _ in keys)
        assert set(counts.values()) == {REPEATS} and len(counts) == IMAGES // REPEATS
        assert len({seed for _, seed in keys}) == IMAGES  # every copy its own augmentation
