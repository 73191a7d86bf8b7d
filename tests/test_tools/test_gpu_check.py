"""tools/gpu_check.py without a GPU: one line that says so, exit status 2, no report."""

import os
import subprocess
import sys

from helpers import REPO

TOOL = REPO / 'tools' / 'gpu_check.py'


def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    out = tmp_path / 'report.json'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    done = subprocess.run([sys.executable, str(TOOL), '--out', str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines == ['gpu_check: no CUDA GPU is visible; run it on a machine with one']
    assert not out.exists()
