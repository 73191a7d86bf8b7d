"""tools/bench_input.py runs end to end on a few images and writes the figures it reports."""
import json
import subprocess
import sys

from helpers import REPO


def test_the_input_benchmark_writes_its_figures(tmp_path):
    for what, extra in (('pipeline', ['--images', '6', '--rounds', '1']),
                        ('listing', ['--images', '300', '--index-entries', '5000'])):
        out = tmp_path / f'{what}.json'
        proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'bench_input.py'), what,
                               *extra, '--out', str(out)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        assert result['cpu'] and result['command'].startswith('python tools/bench_input.py')
        if what == 'pipeline':
            assert set(result['ratio_to_timm']) == {'timm', 'imagefolder', 'shards'}
            assert all(rate > 0 for rate in result['images_per_s_per_core'].values())
        else:
            assert result['index_entries'] == 5000
            assert all(result[k] > 0 for k in ('serial_scan_s', 'index_build_s',
                                               'index_load_s', 'imagenet_index_load_s'))
