"""Training runs through the command line, as users start them, for the engine tests."""
import os
import signal
import subprocess
import sys
import time

import torch

from . import REPO


def run_train(base, run_dir, *overrides, wait=True, launcher=(sys.executable,), env=None):
    """tools/train.py with the `base` overrides, then `overrides`, in `run_dir`; returns its
    output (wait=True, asserting success) or the running process."""
    cmd = [*launcher, str(REPO / 'tools' / 'train.py'), *base, f'hydra.run.dir={run_dir}',
           *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def wait_for(path, proc, timeout=300):
    """Until `path` exists, failing if `proc` ends first or the time runs out."""
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < timeout
        time.sleep(0.05)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def kill_and_resume(run, run_dir, *overrides, kill_at: int, total: int) -> str:
    """`run(run_dir, ...)` killed with SIGKILL once step `kill_at`'s checkpoint exists (the
    run must save every step), then resumed with trainer.resume=auto; returns the resumed
    run's output."""
    proc = run(run_dir, *overrides, wait=False)
    wait_for(run_dir / 'checkpoints' / f'step-{kill_at:08d}.pth', proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load(run_dir / 'checkpoints' / 'last.pth')['step']
    assert killed_at < total, 'the run finished before it was killed; the test proved nothing'
    return run(run_dir, *overrides, 'trainer.resume=auto')
