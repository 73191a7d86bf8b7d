"""conformer.benchmark: the paper-style reference, the memory probe, and the --smoke run's JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
import conformer  # noqa: F401
from conformer.benchmark import (MODES, NO_CUDA, NO_NATIVE_BF16, SCHEMA, gemm_call, gemm_routes,
                                 paper_attention_forward, paper_fcu_down_forward,
                                 peak_memory_bytes, reference_model, run, unavailable)
from conformer.runtime import native_bf16
from conformer.layers import Attention, FCUDown

REPO = Path(__file__).resolve().parents[1]


def test_paper_attention_matches_the_sdpa_attention():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=6, qkv_bias=True).eval()
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        torch.testing.assert_close(paper_attention_forward(attn, x), attn(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize('map_hw, grid', [((8, 12), (2, 3)), ((7, 9), (3, 4))])
def test_pool_first_fcu_down_equals_the_papers_conv_then_pool(map_hw, grid):
    """Same outputs and gradients, for even windows and for adaptive (overlapping) ones."""
    torch.manual_seed(0)
    fcu = FCUDown(8, 24)
    x = torch.randn(2, 8, *map_hw, requires_grad=True)
    x_t = torch.randn(2, 1 + grid[0] * grid[1], 24)
    ours = fcu(x, x_t, grid)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    paper = paper_fcu_down_forward(fcu, x, x_t, grid)
    (grad_paper,) = torch.autograd.grad(paper.square().sum(), x)
    torch.testing.assert_close(ours, paper, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_ours, grad_paper, atol=1e-5, rtol=1e-5)


def test_reference_model_matches_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=10).eval()
    reference = reference_model(model)
    layers = (Attention, FCUDown)
    patched = [m for m in reference.modules() if isinstance(m, layers)]
    assert {type(m) for m in patched} == set(layers)
    assert all('forward' in vars(m) for m in patched)
    assert not any('forward' in vars(m) for m in model.modules() if isinstance(m, layers))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), atol=1e-5, rtol=0)


def test_peak_memory_counts_the_largest_live_set():
    def fn():
        a = torch.ones(1_000_000)  # 4 MB
        del a
        b = torch.ones(500_000)  # 2 MB, after a is freed
        c = torch.ones(250_000)  # +1 MB: 3 MB live
        return (b.sum() + c.sum()).item()

    peak = peak_memory_bytes(fn, torch.device('cpu'))
    assert 4_000_000 <= peak < 4_000_000 + 65_536


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_every_gemm_route_computes_the_same_product(dtype):
    """The peak is only a yardstick if each route does the full GEMM (a @ b)."""
    cpu = torch.device('cpu')
    assert gemm_routes(cpu, dtype)[0] == 'matmul'
    products = []
    for route in gemm_routes(cpu, dtype):
        torch.manual_seed(0)  # the same a and b for every route
        a, b = torch.randn(64, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype)
        torch.manual_seed(0)
        products.append((route, gemm_call(dtype, 64, cpu, route)(), (a.float() @ b.float())))
    for route, got, want in products:
        tol = 1e-4 if dtype == torch.float32 else 0.5
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=2e-2, msg=route)


def test_bf16_is_skipped_with_its_reason_where_the_device_only_emulates_it(monkeypatch):
    monkeypatch.setattr('conformer.runtime.native_bf16', lambda device: False)
    cpu = torch.device('cpu')
    assert unavailable('bf16', cpu) == NO_NATIVE_BF16 and unavailable('fp32', cpu) is None
    assert gemm_routes(cpu, torch.bfloat16) == ('matmul',)  # oneDNN refuses bf16 there
    result = run('conformer_nano_patch4', [1], 1, 32, 1, 1, False, modes=('eager', 'bf16'),
                 gemm_size=64, skip_training=True, model_kwargs=dict(num_classes=10))
    assert [r['status'] for r in result['inference']] == ['ok', NO_NATIVE_BF16]
    assert list(result['matmul_peak_gflops']) == ['float32']
    monkeypatch.setattr('conformer.runtime.native_bf16', lambda device: True)
    assert unavailable('bf16', cpu) is None


def test_eager_mode_is_required():
    with pytest.raises(ValueError, match="include 'eager'"):
        run('conformer_nano_patch4', [1], 1, 32, 1, 1, False, modes=('fp32',))


def test_smoke_run_writes_the_documented_json(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--smoke',
                           '--keep-freed-memory', '--json', str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'| triton | 1 | {NO_CUDA} |' in proc.stdout
    skipped = {'triton': NO_CUDA} if not torch.cuda.is_available() else {}
    if not native_bf16(torch.device('cpu')):  # AVX2-only CPUs emulate bf16 at a crawl
        skipped['bf16'] = NO_NATIVE_BF16
    result = json.loads(out.read_text())
    assert result['schema'] == SCHEMA and result['settings']['keep_freed_memory'] is True
    assert set(result) >= {'machine', 'settings', 'matmul_peak_gflops', 'memory_method',
                           'inference', 'training'}
    # figures from different CPUs differ a lot (Zen 5's fp32 peak is twice Zen 4's): the
    # JSON and the table header name the CPU
    assert result['machine']['cpu'] and result['machine']['cpu'] in proc.stdout
    # the peak is the fastest route's rate; bf16 is measured only where it is native
    dtypes = ['float32'] + ['bfloat16'] * native_bf16(torch.device('cpu'))
    assert list(result['matmul_route_gflops']) == dtypes
    for dt in dtypes:
        rates = result['matmul_route_gflops'][dt]
        assert set(rates) == set(gemm_routes(torch.device('cpu'), getattr(torch, dt))), rates
        assert result['matmul_peak_gflops'][dt] == max(rates.values()) > 0
        assert rates[result['matmul_peak_route'][dt]] == max(rates.values())
    batches = result['settings']['batch_sizes']
    assert [(r['mode'], r['batch']) for r in result['inference']] == [
        (m, b) for b in batches for m in MODES]
    for r in result['inference']:
        if r['mode'] in skipped:
            assert r['status'] == skipped[r['mode']]
            continue
        assert r['status'] == 'ok'
        for key in ('images_per_s', 'latency_ms_p50', 'latency_ms_p90', 'peak_memory_mb',
                    'achieved_gflops', 'matmul_peak_gflops', 'pct_of_matmul_peak',
                    'speedup_vs_eager'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # % of peak is a median of per-round ratios, so it sits near the ratio of medians
        ratio_of_medians = 100 * r['achieved_gflops'] / r['matmul_peak_gflops']
        assert 0.2 < r['pct_of_matmul_peak'] / ratio_of_medians < 5, r
        assert r['latency_ms_p90'] >= r['latency_ms_p50']
        assert r['max_abs_logit_diff'] < (1e-4 if r['mode'] != 'bf16' else 1.0)
    training = [r for r in result['training'] if r['status'] == 'ok']
    assert {(r['mode'], r['grad_checkpointing']) for r in training} == {
        (m, c) for m in MODES if m not in skipped for c in (False, True)}
    assert all(r['status'] == skipped[r['mode']] for r in result['training']
               if r['status'] != 'ok')
    for r in training:
        assert r['step_ms_p50'] > 0 and r['peak_memory_mb'] > 0
        assert ('memory_saved_pct' in r) == r['grad_checkpointing']
        if r['mode'] == 'fp32':  # same weights and batch: the same first loss
            assert r['loss_abs_diff_vs_eager'] < 1e-4
