"""Multi-process training on CPU: collectives on the group's device (NCCL takes CUDA tensors
only), BatchNorm statistics averaged over ranks, repeated augmentation spread over ranks,
srun launches and one run folder per launch."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conformer.data import GlobalBatchSampler
from conformer.engine import distributed

from helpers import REPO
from helpers.image_folders import make_folder


def free_port(low: int = 20000, high: int = 40000) -> int:
    rng = np.random.default_rng()
    while True:
        port = int(rng.integers(low, high))
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
                return port
            except OSError:
                continue


# --- repeated augmentation ------------------------------------------------------------------

def rank_images(num_samples, global_batch, world_size, repeats, step):
    """The images each rank trains on at `step`."""
    share = global_batch // world_size
    return [[index for index, _ in list(GlobalBatchSampler(
        num_samples, global_batch, rank, world_size, seed=5, repeats=repeats))[
            step * share:(step + 1) * share]] for rank in range(world_size)]


@pytest.mark.parametrize('global_batch, world_size', [(24, 8), (1024, 8), (1024, 32), (30, 3)])
def test_repeated_copies_go_to_different_ranks(global_batch, world_size):
    for step in range(2):
        ranks = rank_images(3 * global_batch, global_batch, world_size, 3, step)
        for images in ranks:  # copies in place gave 1 distinct image in 3 at batch 24 / 8 ranks
            assert len(set(images)) == len(images) == global_batch // world_size
        # what each step trains on does not depend on the world size
        one = rank_images(3 * global_batch, global_batch, 1, 3, step)[0]
        assert sorted(sum(ranks, [])) == sorted(one)
        counts = np.bincount(one)
        assert counts.max() == 3 and len(set(one)) >= global_batch // 3


def test_spread_copies_keep_the_epoch_and_resume_anywhere():
    s = GlobalBatchSampler(60, 12, seed=1, repeats=3)
    s.set_epoch(4)
    full = list(s)
    images = [index for index, _ in full]
    assert all(images.count(i) == 3 for i in set(images)) and len(set(images)) == 20
    assert len({seed for _, seed in full}) == 60  # each copy has its own augmentation
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            resumed = GlobalBatchSampler(60, 12, rank, world_size, seed=1, repeats=3)
            resumed.set_epoch(4, start_step=2)
            share = 12 // world_size
            expected = [key for step in range(2, 5)
                        for key in full[step * 12 + rank * share:step * 12 + (rank + 1) * share]]
            assert list(resumed) == expected


# --- collectives in process groups ----------------------------------------------------------

def run_ranks(fn, backend, world_size=2, *args):
    mp.spawn(_join, args=(fn, backend, world_size, free_port(), args), nprocs=world_size)


def _join(rank, fn, backend, world_size, port, args):
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _bn_model(rank):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    for i, bn in enumerate((model[1], model[2][0])):
        bn.running_mean.fill_(rank + i)  # rank 0: 0, rank 1: 1 (second BN: 1, 2)
        bn.running_var.fill_(1 + 3 * rank)  # 1 and 4
        bn.num_batches_tracked.fill_(10 * (rank + 1))
    return model


def _sums_barriers_and_bn(rank):
    assert distributed.collective_device() == torch.device('cpu')
    summed = distributed.all_sum(torch.tensor([rank + 1.0, 2.0], dtype=torch.float64))
    assert summed.tolist() == [3.0, 4.0] and summed.device.type == 'cpu'
    distributed.barrier()
    model, ema = _bn_model(rank), _bn_model(rank)
    weight = model[0].weight.clone()
    distributed.distribute_bn(model, None, ema)
    for module in (model, ema):
        for i, bn in enumerate((module[1], module[2][0])):
            torch.testing.assert_close(bn.running_mean, torch.full((bn.num_features,), 0.5 + i))
            torch.testing.assert_close(bn.running_var, torch.full((bn.num_features,), 2.5))
            assert bn.num_batches_tracked.item() == 10 * (rank + 1)  # a count, not a statistic
    assert torch.equal(model[0].weight, weight)


def test_gloo_collectives_sum_on_the_cpu_and_average_batchnorm_statistics_over_two_ranks():
    run_ranks(_sums_barriers_and_bn, 'gloo')


def _cuda_only_group(rank):
    # the group rejects CPU tensors as an NCCL group does
    with pytest.raises(RuntimeError, match='No backend type associated with device type cpu'):
        dist.all_reduce(torch.zeros(1, dtype=torch.float64))
    helpers = {
        'all_sum': lambda: distributed.all_sum(torch.zeros(5, dtype=torch.float64)),
        'barrier': distributed.barrier,
        'distribute_bn': lambda: distributed.distribute_bn(_bn_model(rank)),
        'all_gather_object': lambda: dist.all_gather_object([None, None], {'rng': rank}),
    }
    for name, helper in helpers.items():
        if torch.cuda.is_available():  # the helpers then run on the GPU(s)
            torch.cuda.set_device(rank % torch.cuda.device_count())
            helper()
            continue
        # without GPUs the tensor cannot reach the CUDA device the group takes; what matters
        # is that no helper hands the group a CPU tensor
        with pytest.raises(RuntimeError) as err:
            helper()
        assert 'device type cpu' not in str(err.value), name
        assert 'NVIDIA' in str(err.value) or 'CUDA' in str(err.value), (name, str(err.value))
    torch.cuda.current_device = lambda: rank  # as set_device(local_rank) makes it on a GPU
    assert distributed.collective_device() == torch.device('cuda', rank)


def test_a_group_that_takes_cuda_tensors_only_never_gets_a_cpu_tensor():
    run_ranks(_cuda_only_group, 'cuda:gloo')


# --- launchers ------------------------------------------------------------------------------

@pytest.mark.parametrize('nodelist, host', [('gpu[003-005,009],cpu1', 'gpu003'),
                                            ('node7', 'node7'), ('a1,b2', 'a1'),
                                            ('n[12,14]', 'n12')])
def test_the_master_is_the_first_host_of_the_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


def test_srun_variables_give_the_rank_world_size_and_master(monkeypatch):
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_JOB_ID', '123456')
    monkeypatch.setenv('SLURM_NODELIST', 'gpu[07-08]')
    assert distributed.launch_env() == distributed.Launch(5, 8, 1)
    assert distributed.master_address() == ('gpu07', str(20000 + 123456 % 20000))
    monkeypatch.setenv('MASTER_PORT', '1234')  # the user's choice wins
    assert distributed.master_address() == ('gpu07', '1234')
    monkeypatch.setenv('WORLD_SIZE', '2')  # torchrun inside an allocation: its variables win
    monkeypatch.setenv('RANK', '1')
    assert distributed.launch_env() == distributed.Launch(1, 2, 0)
    assert distributed.master_address() == ('127.0.0.1', '1234')


LAUNCH_VARIABLES = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
                    'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_JOB_ID',
                    'CONFORMER_RENDEZVOUS_TIMEOUT')


@pytest.mark.parametrize('variables, message', [
    (dict(SLURM_PROCID='1', SLURM_NTASKS='1'), 'SLURM_PROCID=1 with SLURM_NTASKS=1: a rank must'),
    (dict(SLURM_PROCID='0', SLURM_NTASKS='abc'), "SLURM_NTASKS='abc' is not an integer >= 1"),
    (dict(SLURM_PROCID='-1', SLURM_NTASKS='2'), "SLURM_PROCID='-1' is not an integer >= 0"),
    (dict(SLURM_PROCID='0', SLURM_NTASKS='0'), "SLURM_NTASKS='0' is not an integer >= 1"),
    (dict(WORLD_SIZE='2', RANK='2'), 'RANK=2 with WORLD_SIZE=2'),
    (dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='x'), "LOCAL_RANK='x' is not an integer"),
    (dict(SLURM_PROCID='0', SLURM_NTASKS='2', SLURM_JOB_ID='j1'), "SLURM_JOB_ID='j1'"),
    (dict(WORLD_SIZE='2', RANK='0', MASTER_PORT='99999'), "MASTER_PORT='99999' is not a TCP"),
    (dict(WORLD_SIZE='2', RANK='0', CONFORMER_RENDEZVOUS_TIMEOUT='soon'),
     "CONFORMER_RENDEZVOUS_TIMEOUT='soon' must be a number of seconds > 0"),
])
def test_a_wrong_launcher_variable_is_named(monkeypatch, variables, message):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.LaunchError) as error:
        distributed.check_launch()
    assert message in str(error.value)


def test_a_rank_whose_peers_never_start_says_it_waits_and_gives_up(monkeypatch, capsys):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    monkeypatch.setenv('SLURM_NODELIST', 'localhost')
    monkeypatch.setenv('SLURM_JOB_ID', str(port - 20000))
    monkeypatch.setenv('CONFORMER_RENDEZVOUS_TIMEOUT', '1')
    monkeypatch.setattr(distributed, '_store', None)
    tic = time.monotonic()
    with pytest.raises(distributed.LaunchError) as error:
        distributed.launch_time()
    assert time.monotonic() - tic < 60
    assert 'waiting up to 1 s for the other ranks to join at localhost:' in capsys.readouterr().err
    assert 'rank 0 of 2: the other ranks did not join' in str(error.value)
    assert 'SLURM_NTASKS=2' in str(error.value) and 'CONFORMER_RENDEZVOUS_TIMEOUT' in str(
        error.value)
    monkeypatch.setattr(distributed, '_store', None)


RECORDER = """
import json, os, runpy, sys
import torch, torch.distributed as dist
seen = []

def record(name, collective):
    def call(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, torch.Tensor):
                    seen.append([name, str(item.device)])
        seen.append([name, None])
        return collective(*args, **kwargs)
    return call

for name in ('all_reduce', 'broadcast', 'all_gather', 'all_gather_into_tensor', 'reduce',
             'reduce_scatter_tensor', 'gather', 'scatter', 'all_to_all', 'barrier',
             'all_gather_object', 'broadcast_object_list', 'gather_object'):
    setattr(dist, name, record(name, getattr(dist, name)))
# BatchNorm statistics of the trained model before and after each distribute_bn call
import conformer.engine.trainer as trainer
averaged = []
average = trainer.distribute_bn

def distribute_bn(model, *more):
    name, stat = next((n, b) for n, b in model.named_buffers() if n.endswith('running_mean'))
    before = stat.tolist()
    average(model, *more)
    averaged.append([name, before, stat.tolist()])

trainer.distribute_bn = distribute_bn
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    with open(os.environ['RECORD'] + os.environ['SLURM_PROCID'], 'w') as f:
        json.dump(dict(collectives=seen, averaged=averaged), f)
"""


def listening(port: int) -> bool:
    """Whether a local socket listens on `port` (read from /proc, without connecting)."""
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == '0A' and int(local.rsplit(':', 1)[1], 16) == port:
                    return True
    return False


def test_srun_ranks_started_a_second_apart_share_one_run_folder_and_collect_on_the_device(
        tmp_path):
    images = make_folder(tmp_path / 'images', per_class=8)
    (tmp_path / 'recorder.py').write_text(RECORDER)
    work = tmp_path / 'work'
    work.mkdir()
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    base.update(OMP_NUM_THREADS='1', SLURM_NTASKS='2', SLURM_NODELIST='localhost',
                SLURM_JOB_ID=str(port - 20000), RECORD=str(tmp_path / 'collectives'))
    cmd = [sys.executable, str(tmp_path / 'recorder.py'), str(REPO / 'tools' / 'train.py'),
           'model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
           'model.num_heads=2', 'model.depth=6', 'data.input_size=16', 'data.batch_size=8',
           'data.eval_batch_size=8', 'data.num_workers=0', f'data.root={images}', 'aug=small',
           'trainer.max_steps=2', 'trainer.threads=1', 'trainer.device=cpu',
           'logging.progress=false']
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen(
            cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))))
        # rank 0 names its folder (from its own clock, or from the shared launch time once
        # rank 1 joins its store); rank 1 then starts in another second
        deadline = time.monotonic() + 300
        while not ((work / 'outputs').exists() or listening(port)) and procs[0].poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.2)
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    folders = list((work / 'outputs' / 'train').iterdir())
    assert len(folders) == 1, folders
    metrics = json.loads((folders[0] / 'metrics.json').read_text())
    assert metrics['step'] == 2
    state = torch.load(folders[0] / 'checkpoints' / 'last.pth', map_location='cpu',
                       weights_only=True)
    assert state['world_size'] == 2
    records = [json.loads((tmp_path / f'collectives{rank}').read_text()) for rank in range(2)]
    for record in records:
        assert any(name == 'all_reduce' for name, _ in record['collectives'])  # it saw the run
        devices = {device for _, device in record['collectives'] if device is not None}
        assert devices == {'cpu'}  # env.device of a trainer.device=cpu run
    # BatchNorm statistics: averaged over the ranks before the eval and the checkpoint, and
    # the checkpoint holds the average
    calls = [record['averaged'] for record in records]
    assert len(calls[0]) == len(calls[1]) >= 2
    assert calls[0][0][1] != calls[1][0][1]  # each rank's own images gave it its own statistics
    for (name, before0, after0), (_, before1, after1) in zip(*calls):
        mean = (torch.tensor(before0, dtype=torch.float64) + torch.tensor(before1)) / 2
        torch.testing.assert_close(torch.tensor(after0, dtype=torch.float64), mean)
        assert after0 == after1
    torch.testing.assert_close(state['model'][name], torch.tensor(after0))
