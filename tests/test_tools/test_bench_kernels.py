"""tools/bench_kernels.py --smoke runs every suite through the Triton interpreter, writes JSON."""

import json
import math
import subprocess
import sys

from helpers import REPO

TOOL = REPO / 'tools' / 'bench_kernels.py'


def test_bench_smoke_writes_a_report(tmp_path):
    out = tmp_path / 'bench.json'
    subprocess.run([sys.executable, str(TOOL), '--smoke', '--reps', '1', '--out', str(out)],
                   check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    assert report['interpreter'] is True and report['dtype'] == 'float32'
    assert set(report['targets']) == {'attention', 'conv', 'model'}
    rows = report['results']
    assert {r['suite'] for r in rows} == {'attention', 'conv', 'fcu'}
    for case in {r['case'] for r in rows}:
        impls = [r for r in rows if r['case'] == case]
        assert len(impls) == 2 and impls[0]['impl'] == 'triton', case
        assert impls[0]['speedup'] > 0 and impls[1]['speedup'] is None
        for r in impls:
            assert r['ms'] > 0 and math.isfinite(r['tflops']) and r['pct_peak_flops'] is None
            assert r['max_abs_err'] < 1e-4, (case, r['max_abs_err'])  # fp32: the two paths agree
