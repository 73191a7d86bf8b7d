"""What a run says: the end line names the eval split, the last and the best checkpoint and
only the records it wrote; errors of optional packages and of DataLoader workers are one
line; no more loader workers than cores (PyTorch's warning)."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conformer.data import GlobalBatchSampler
from conformer.engine import build, cli
from conformer.engine.config import AugConfig, DataConfig
from conformer.engine.logger import RunLogger

RESULT = dict(status='finished', epoch=3, step=30, top1=97.21, top1_conv=96.5, top1_trans=97.0,
              best_top1=97.49, count=360)


def run_folder(tmp_path: Path) -> Path:
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    for name in ('step-00000020.pth', 'step-00000030.pth', 'best.pth'):
        (checkpoints / name).write_bytes(b'weights')
    return checkpoints / 'step-00000030.pth'


def test_the_end_line_names_the_split_and_which_checkpoint_each_figure_is_from(tmp_path):
    last = run_folder(tmp_path)
    (tmp_path / 'curves.png').write_bytes(b'png')
    line = cli.run_summary(dict(RESULT, checkpoint=str(last)), 'val', tmp_path, plot=True)
    assert line.startswith(f'val top-1 97.21% of the last checkpoint {last} (model;')
    assert f'best val top-1 97.49%: {tmp_path}/checkpoints/best.pth' in line
    assert 'test top-1' not in line
    assert line.endswith(f'{tmp_path}/metrics.json | {tmp_path}/curves.png')


def test_the_end_line_names_no_best_checkpoint_when_it_is_the_last(tmp_path):
    last = run_folder(tmp_path)
    line = cli.run_summary(dict(RESULT, best_top1=97.21, checkpoint=str(last)), 'test',
                           tmp_path, plot=True)
    assert line.startswith('test top-1 97.21% of the last checkpoint') and 'best' not in line


def test_a_run_without_plots_names_no_curves_png(tmp_path):
    last = run_folder(tmp_path)
    (tmp_path / 'curves.png').write_bytes(b'png')  # an earlier run's, say
    line = cli.run_summary(dict(RESULT, checkpoint=str(last)), 'val', tmp_path, plot=False)
    assert 'curves.png' not in line
    (tmp_path / 'curves.png').unlink()
    line = cli.run_summary(dict(RESULT, checkpoint=str(last)), 'val', tmp_path, plot=True)
    assert 'curves.png' not in line  # none was drawn (no evaluation yet)


def test_tensorboard_without_its_package_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import now fails
    with pytest.raises(ValueError, match='logging.tensorboard=true needs the tensorboard '
                                         'package: pip install tensorboard') as error:
        RunLogger(tmp_path, enabled=True, tensorboard=True, plot=False)
    assert cli.exit_status(error.value) == 1


class Failing(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        try:
            open('/nonexistent/image.png', 'rb')
        except OSError as e:
            raise ValueError('class folder /data/train/cat holds no readable image') from e


def test_an_error_raised_in_a_dataloader_worker_is_reported_in_one_line():
    with pytest.raises(ValueError) as error:  # the worker's traceback is in the message
        next(iter(DataLoader(Failing(), num_workers=1)))
    assert 'Original Traceback' in str(error.value)
    assert cli.exit_status(error.value) == 1
    assert cli._one_line(error.value) == 'class folder /data/train/cat holds no readable image'


def test_a_tensor_error_keeps_its_traceback():  # a bug, not the user's to fix
    with pytest.raises(RuntimeError) as error:
        torch.zeros(2) @ torch.zeros(3)
    assert cli.exit_status(error.value) is None


def test_crowded_cores_are_named_early_with_the_time_left(monkeypatch, caplog):
    from conformer.engine import logger
    monkeypatch.setattr(logger.os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(logger.os, 'cpu_count', lambda: 2)
    monkeypatch.setattr(logger.torch, 'get_num_threads', lambda: 2)
    clock = iter(range(0, 1000, 10))  # 10 s between checks
    monkeypatch.setattr(logger.time, 'perf_counter', lambda: next(clock))
    load = [3.0]
    monkeypatch.setattr(logger.os, 'getloadavg', lambda: (load[0], 0., 0.))
    pace = logger.PaceMonitor()
    for step in (50, 100):  # the first check (warm-up) only starts the clock
        pace.step = step
        pace.check(total_steps=2000)
    assert not caplog.records  # load 3 on 2 cores: the run's own threads and a little more
    load[0] = 5.0
    pace.step = 150
    pace.check(total_steps=2000)
    pace.step = 200
    pace.check(total_steps=2000)  # warns once
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and 'the load average on the 2 cores it may use is 5.0' in warnings[0]
    # 100 steps in 20 s since the warm-up: 1850 steps left take 370 s
    assert 'needs about 6 min more' in warnings[0] and 'trainer.threads=1' in warnings[0]
    for quiet in (logger.PaceMonitor(enabled=False), logger.PaceMonitor()):
        for step in (50, 100, 150):
            quiet.step = step
            quiet.check(total_steps=2000, device_type='cpu' if not quiet.enabled else 'cuda')
    assert len(caplog.records) == 1  # other ranks and GPUs are not judged


def test_a_run_pinned_to_some_cores_is_judged_by_its_share_of_the_load(monkeypatch, caplog):
    # One thread on one of 16 cores: the machine's load of 16 (every core busy once) is no
    # crowding of this run's core; a load of 48 (three threads per core) is.
    from conformer.engine import logger
    monkeypatch.setattr(logger.os, 'sched_getaffinity', lambda pid: {3}, raising=False)
    monkeypatch.setattr(logger.os, 'cpu_count', lambda: 16)
    monkeypatch.setattr(logger.torch, 'get_num_threads', lambda: 1)
    monkeypatch.setattr(logger.time, 'perf_counter', iter(range(0, 1000, 10)).__next__)
    load = [16.0]
    monkeypatch.setattr(logger.os, 'getloadavg', lambda: (load[0], 0., 0.))
    pace = logger.PaceMonitor()
    for step in (50, 100, 150):
        pace.step = step
        pace.check(total_steps=2000)
    assert not caplog.records
    load[0] = 48.0
    pace.step = 200
    pace.check(total_steps=2000)
    [warning] = [r.getMessage() for r in caplog.records]
    assert 'the load average on the 1 core it may use is 3.0' in warning
    assert 'trainer.threads=1' not in warning  # it runs one thread already


class RandomImages(Dataset):
    def __init__(self, n: int):
        self.pixels = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return Image.fromarray(self.pixels[index].numpy()), index % 3


def test_loader_workers_never_outnumber_the_cores_and_never_change_the_batches(monkeypatch):
    """data.num_workers=4 on a 1-core share runs one worker (no PyTorch warning at each epoch),
    and the augmented batches are those of the main process."""
    data = OmegaConf.structured(DataConfig(input_size=12, num_workers=4))
    aug = OmegaConf.structured(AugConfig(scale=[0.3, 1.0]))
    dataset = RandomImages(12)

    def batches(workers):
        monkeypatch.setattr(build, 'available_cores', lambda: workers)
        loader = build.train_loader(dataset, data, aug, GlobalBatchSampler(12, 4, seed=1), 4,
                                    epoch_seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # PyTorch's worker-count warning fails the test
            return loader.num_workers, list(loader)

    (one, one_core), (none, main_process) = batches(1), batches(0)
    assert (one, none) == (1, 0)
    assert len(one_core) == 3
    for (x, y), (x0, y0) in zip(one_core, main_process):
        assert torch.equal(x, x0) and torch.equal(y, y0)
