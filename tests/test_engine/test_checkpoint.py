"""Checkpoint files and RNG capture: atomic writes, retention, weights_only loading; the CPU
allocator setting the trainer makes; the autocast it picks for the machine."""
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conformer.engine import checkpoint as ckpt
from conformer.engine.evaluate import resolve_amp
from conformer.runtime import native_bf16


def test_manager_keeps_the_newest_files_and_links_last_and_best(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save({'step': step, 'w': torch.full((2,), float(step))}, step, is_best=step == 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['best.pth', 'last.pth', 'step-00000002.pth', 'step-00000003.pth']
    assert ckpt.load(tmp_path / 'last.pth')['step'] == 3
    assert ckpt.load(tmp_path / 'best.pth')['step'] == 2
    manager.save({'step': 4}, 4, is_best=False)
    assert ckpt.load(tmp_path / 'best.pth')['step'] == 2  # best survives pruning of its step file
    assert manager.latest() == tmp_path / 'last.pth'


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'c.pth'
    ckpt.atomic_save({'v': 1}, path)

    def crash(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({'v': 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path) == {'v': 1}


@pytest.mark.parametrize('key', ['trainer.resume', 'checkpoint'])
def test_unreadable_checkpoints_name_the_callers_setting_and_the_fix(tmp_path, key):
    ckpt.atomic_save({'w': torch.zeros(1000)}, tmp_path / 'a.pth')
    (tmp_path / 'b.pth').write_bytes((tmp_path / 'a.pth').read_bytes()[:500])
    (tmp_path / 'c.txt').write_text('hello')
    other = 'checkpoint=' if key == 'trainer.resume' else 'trainer.resume'
    for name, error, message in (('b.pth', RuntimeError, 'older step-'),
                                 ('c.txt', RuntimeError, 'not a .pth file'),
                                 ('none.pth', FileNotFoundError, 'does not exist'),
                                 ('.', IsADirectoryError, 'is a folder; pass a .pth file')):
        with pytest.raises(error, match=message) as err:
            ckpt.load(tmp_path / name, key)
        assert f'{key}={tmp_path / name}' in str(err.value)
        assert other not in str(err.value)
    with pytest.raises(ValueError, match='not a checkpoint written by conformer-train.*'
                                         "lacks 'model'.*model.checkpoint="):
        ckpt.load(tmp_path / 'a.pth', key, required=('model', 'step'))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.atomic_save({'rng': ckpt.capture_rng()}, tmp_path / 'r.pth')

    def draw():
        return (torch.rand(3), np.random.normal(), np.random.rand(), random.random(),
                random.gauss(0, 1))

    expected = draw()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.restore_rng(ckpt.load(tmp_path / 'r.pth')['rng'])
    again = draw()
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


FAULTS_PER_STEP = """
import resource, sys, torch
from conformer.runtime import keep_freed_memory
if sys.argv[1] == 'keep':
    keep_freed_memory()
def step():  # four 40 MiB activations, allocated then freed, as in a training step
    xs = [torch.ones(10 << 20) for _ in range(4)]
    del xs
for _ in range(3):  # the heap grows to its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='tunes glibc malloc')
def test_freed_activation_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', FAULTS_PER_STEP, mode], check=True,
                             capture_output=True, text=True).stdout
        return float(out)
    pages = 4 * (40 << 20) // 4096
    assert faults('default') > pages / 2  # glibc hands the pages back and faults them in again
    assert faults('keep') < pages / 100


@pytest.mark.parametrize('native', [True, False])
def test_amp_auto_is_bf16_only_where_the_device_has_native_bf16(native, monkeypatch):
    monkeypatch.setattr('conformer.runtime.native_bf16', lambda device: native)
    cpu = torch.device('cpu')
    assert resolve_amp('auto', cpu) == ('bf16' if native else 'none')
    assert resolve_amp('none', cpu) == 'none'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert resolve_amp('bf16', cpu, 'trainer.amp') == 'bf16'  # asked for: kept, warned
    assert len(caught) == (0 if native else 1)
    assert all('set trainer.amp=auto' in str(w.message) for w in caught)
    with pytest.raises(ValueError, match='trainer.amp=fp16 needs a GPU'):
        resolve_amp('fp16', cpu, 'trainer.amp')


@pytest.mark.skipif(not Path('/proc/cpuinfo').is_file(), reason='reads the CPU flags on Linux')
def test_native_bf16_follows_the_cpu_flags():
    """An x86 CPU runs bf16 natively only with a bf16 instruction; oneDNN's own check also
    passes AVX-512 CPUs that emulate it (Ice Lake: bf16 matmuls at a quarter of fp32's speed)."""
    info = Path('/proc/cpuinfo').read_text().split('\n\n')[0]
    flags = set(next((line.split(':', 1)[1] for line in info.splitlines()
                      if line.startswith('flags')), '').split())
    expected = (bool(flags & {'avx512_bf16', 'amx_bf16', 'avx_ne_convert'}) if flags  # x86
                else torch.ops.mkldnn._is_mkldnn_bf16_supported())  # elsewhere oneDNN's check
    assert native_bf16(torch.device('cpu')) is expected


@pytest.mark.parametrize('flags, native', [
    ({'avx2', 'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'}, False),  # Skylake-SP to Ice Lake
    ({'avx2', 'avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx512_bf16'}, True),  # Zen 4
    ({'avx2', 'avx_ne_convert'}, True),
    (None, True),  # no x86 flags (aarch64): oneDNN's check stands
])
def test_bf16_emulated_by_onednn_does_not_count_as_native(flags, native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    monkeypatch.setattr('conformer.runtime.cpu_flags',
                        lambda: None if flags is None else frozenset(flags))
    assert native_bf16(torch.device('cpu')) is native
    assert resolve_amp('auto', torch.device('cpu')) == ('bf16' if native else 'none')


def test_a_torn_last_metrics_line_is_dropped_and_a_corrupt_one_named(tmp_path, caplog):
    from conformer.engine.logger import RunLogger
    path = tmp_path / 'metrics.jsonl'
    whole = [json.dumps(dict(kind='train', step=s, loss=1.0 / s, top1=10.0 * s)) for s in (1, 2)]
    path.write_text('\n'.join(whole) + '\n' + whole[0][:17])  # killed while writing a line
    logger = RunLogger(tmp_path, enabled=True, tensorboard=False, plot=True)
    assert path.read_text() == '\n'.join(whole) + '\n'
    assert 'ended in a cut-off line' in caplog.text
    logger.log('eval', 2, loss=0.5, top1=40.0)  # appends a line of its own, and plots
    assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 2]
    assert (tmp_path / 'curves.png').is_file()
    # a damaged line inside the file is named and left out; a torn one at the end, skipped
    path.write_text(whole[0] + '\n{"kind": tr\n' + whole[1] + '\n' + whole[0][:17])
    caplog.clear()
    assert [r['step'] for r in logger.history()] == [1, 2]
    assert f'{path} line 2 is not a JSON record' in caplog.text and 'line 4' not in caplog.text


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    from conformer.engine.logger import RunLogger
    (tmp_path / 'metrics.jsonl').write_text('{"kind": "train", "step": 1}')
    RunLogger(tmp_path, enabled=True, tensorboard=False, plot=False).log('train', 2)
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['step'] for line in lines] == [1, 2]
