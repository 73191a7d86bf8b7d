"""Training runs through the command line, as users start them, for the engine tests."""
import os
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
