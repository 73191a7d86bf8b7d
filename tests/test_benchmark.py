"""conformer.benchmark and conformer-benchmark: the eager reference on the kernels' references,
the memory probe, and the --smoke run's JSON."""
import importlib
import json
import math
import subprocess
import sys

import pytest
import timm
import torch

import conformer  # noqa: F401
from conformer.benchmark import (
    FLOAT_MODES,
    MODES,
    NO_CUDA,
    NO_NATIVE_BF16,
    PEERS,
    SCHEMA,
    gemm_call,
    gemm_routes,
    peak_memory_bytes,
    reference_model,
    run,
    unavailable,
)
from conformer.cli.benchmark import format_table, main
from conformer.kernels import use_backend
from conformer.layers import KernelLayer
from conformer.runtime import native_bf16

from helpers import REPO


def test_reference_model_runs_every_op_on_its_pytorch_reference(monkeypatch):
    """Even with Triton as the default backend, the eager baseline takes the PyTorch route of
    every op, gives the model's outputs, and leaves the model's own backend alone."""
    routes = []
    for name in ('flash_attention', 'fcu', 'conv', 'linear'):
        module = importlib.import_module(f'conformer.kernels.{name}')
        def recorded(op, *args, dispatch=module.dispatch, **kwargs):
            routes.append((op, dispatch(op, *args, **kwargs)))
            return routes[-1][1]
        monkeypatch.setattr(module, 'dispatch', recorded)
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=10).eval()
    reference = reference_model(model)
    assert all(m.kernel_backend is None for m in model.modules() if isinstance(m, KernelLayer))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        with use_backend('triton'):
            got = reference(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ops = {op for op, _ in routes}
    assert ops == {'attention', 'fcu_down', 'fcu_up', 'conv_bn_act', 'linear'}
    assert {route for _, route in routes} == {'torch'}


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
    # a CPU without native bf16, as oneDNN and PyTorch see it (AVX2 only)
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    cpu = torch.device('cpu')
    assert unavailable('bf16', cpu) == NO_NATIVE_BF16 and unavailable('fp32', cpu) is None
    assert gemm_routes(cpu, torch.bfloat16) == ('matmul',)  # oneDNN refuses bf16 there
    result = run(['conformer_nano_patch4'], [1], 1, 32, 1, 1, False, modes=('eager', 'bf16'),
                 gemm_size=64, skip_training=True, model_kwargs=dict(num_classes=10))
    assert [r['status'] for r in result['variants'][0]['inference']] == ['ok', NO_NATIVE_BF16]
    assert list(result['matmul_peak_gflops']) == ['float32']
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    monkeypatch.setattr('conformer.runtime.cpu_flags', lambda: frozenset({'avx512_bf16'}))
    assert unavailable('bf16', cpu) is None and gemm_routes(cpu, torch.bfloat16)[-1] == 'onednn'


def test_eager_mode_is_required():
    with pytest.raises(ValueError, match="include 'eager'"):
        run(['conformer_nano_patch4'], [1], 1, 32, 1, 1, False, modes=('fp32',))


def test_several_variants_each_at_their_own_input_size_with_a_summary_row_per_batch():
    result = run(['conformer_nano_patch4', 'conformer_tiny_patch16'], [1, 2], 1, None, 1, 1,
                 False, modes=('eager', 'fp32'), gemm_size=64, skip_training=True)
    nano, tiny = result['variants']
    assert (nano['variant'], nano['image_size'], tiny['variant'], tiny['image_size']) == (
        'conformer_nano_patch4', 32, 'conformer_tiny_patch16', 224)
    assert round(tiny['params_m'], 2) == 23.52  # the paper's count, at 1000 classes
    # each variant's own FLOPs: Conformer-Ti at 224 px is ~5 GMACs an image, nano at 32 px ~0.1
    flops = {v['variant']: v['inference'][0]['gflop_per_call'] for v in result['variants']}
    assert 9 < flops['conformer_tiny_patch16'] < 12 and flops['conformer_nano_patch4'] < 0.5
    table = format_table(result)
    assert table.count('| mode | batch |') == 2  # one table per variant
    for v in (nano, tiny):
        assert f"{v['variant']} @ {v['image_size']}px" in table
        rows = {(r['mode'], r['batch']): r for r in v['inference']}
        for batch in (1, 2):
            eager, fp32 = rows['eager', batch], rows['fp32', batch]
            assert (f"| {v['variant']} | {v['params_m']:.2f} | {batch} | "
                    f"{eager['images_per_s']:.3g} | {fp32['images_per_s']:.3g} "
                    f"({fp32['speedup_vs_eager']:.2f}x) |") in table


@pytest.mark.parametrize('args, message', [
    (['--model', 'conformer_small_patch16', 'resnet50'], "unknown model 'resnet50'; choose one of"),
    (['--batch-sizes', '1', '0'], '--batch-sizes must be >= 1, got 0'),
    (['--image-size', '8', '--batch-sizes', '1', '--skip-training'],
     'smaller than the patch size 16'),
    (['--json', '/proc/no/such/dir/bench.json'], 'cannot write --json'),
    (['--smoke', '--model', 'conformer_base_patch16'], '--smoke picks its own tiny model'),
    (['--batch-sizes', '--skip-training'], 'nothing to measure'),
])
def test_bad_arguments_stop_with_a_usage_error_before_any_timing(args, message, capsys,
                                                                  tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --json lands here
    with pytest.raises(SystemExit) as exit_info:
        main(['--modes', 'eager', '--rounds', '1', '--warmup', '1', *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


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
                           'variants'}
    [variant] = result['variants']
    assert variant['variant'] == 'conformer_nano_patch4' and variant['image_size'] == 32
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
    assert [(r['mode'], r['batch']) for r in variant['inference']] == [
        (m, b) for b in batches for m in FLOAT_MODES]
    # the profiler behind the memory column logs its start, stop and GPU probe natively
    for noise in ('profiler_start', 'profiler_stop', 'gpuGetDeviceCount', 'USDT:'):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    eager_p50 = {r['batch']: r['latency_ms_p50'] for r in variant['inference']
                 if r['mode'] == 'eager'}
    for r in variant['inference']:
        if r['mode'] in skipped:
            assert r['status'] == skipped[r['mode']]
            continue
        assert r['status'] == 'ok'
        for key in ('images_per_s', 'latency_ms_p50', 'latency_ms_p90', 'peak_memory_mb',
                    'achieved_gflops', 'matmul_peak_gflops', 'pct_of_matmul_peak',
                    'speedup_vs_eager'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        # the columns agree: speed-up is the ratio of the median latencies (so of img/s), and
        # % of peak the achieved rate over the peak's
        assert r['speedup_vs_eager'] == pytest.approx(eager_p50[r['batch']]
                                                      / r['latency_ms_p50'])
        assert r['images_per_s'] == pytest.approx(1e3 * r['batch'] / r['latency_ms_p50'])
        assert r['pct_of_matmul_peak'] == pytest.approx(
            100 * r['achieved_gflops'] / r['matmul_peak_gflops'])
        assert r['top1_agreement'] == 1.0 or r['mode'] == 'bf16', r
        assert r['latency_ms_p90'] >= r['latency_ms_p50']
        assert r['max_abs_logit_diff'] < (1e-4 if r['mode'] != 'bf16' else 1.0)
    training = [r for r in variant['training'] if r['status'] == 'ok']
    assert {(r['mode'], r['grad_checkpointing']) for r in training} == {
        (m, c) for m in FLOAT_MODES if m not in skipped for c in (False, True)}
    train_eager = {c: r['step_ms_p50'] for r in training if r['mode'] == 'eager'
                   for c in [r['grad_checkpointing']]}
    for r in training:
        assert r['speedup_vs_eager'] == pytest.approx(
            train_eager[r['grad_checkpointing']] / r['step_ms_p50'])
    assert all(r['status'] == skipped[r['mode']] for r in variant['training']
               if r['status'] != 'ok')
    for r in training:
        assert r['step_ms_p50'] > 0 and r['peak_memory_mb'] > 0
        assert ('memory_saved_pct' in r) == r['grad_checkpointing']
        if r['mode'] == 'fp32':  # same weights and batch: the same first loss
            assert r['loss_abs_diff_vs_eager'] < 1e-4


def test_int8_and_peer_modes_name_the_package_they_miss(monkeypatch):
    cpu = torch.device('cpu')
    missing = {'torchao', 'openvino'}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name in missing else find_spec(name, *a))
    assert unavailable('int8', cpu) == \
        "skipped: torchao not installed (pip install 'conformer-zoo[int8]')"
    for mode in ('ov_fp32', 'ov_int8'):
        assert unavailable(mode, cpu) == \
            "skipped: openvino not installed (pip install 'conformer-zoo[peers]')"
    assert set(MODES) >= {'eager', 'fp32', 'bf16', 'int8', 'ort_fp32', 'ort_int8', 'ov_fp32',
                          'ov_bf16', 'ov_int8'}
    assert unavailable('ort_fp32', torch.device('cuda')) == 'skipped: CPU deploy only'


def test_peers_are_refused_while_openmp_threads_would_spin(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv('OMP_WAIT_POLICY', 'active')
    with pytest.raises(SystemExit) as exit_info:
        main(['--modes', 'eager', 'ov_fp32', '--json', str(tmp_path / 'b.json')])
    assert exit_info.value.code == 2
    assert 'OMP_WAIT_POLICY=ACTIVE makes idle PyTorch threads spin' in capsys.readouterr().err


def test_by_default_spinning_threads_leave_the_peers_out_and_say_so(monkeypatch, capsys,
                                                                    tmp_path):
    monkeypatch.setenv('OMP_WAIT_POLICY', 'active')
    out = tmp_path / 'b.json'
    main(['--model', 'conformer_nano_patch4', '--image-size', '32', '--batch-sizes', '1',
          '--rounds', '1', '--warmup', '1', '--skip-training', '--json', str(out)])
    assert 'the peers (ONNX Runtime, OpenVINO) are left out' in capsys.readouterr().err
    [variant] = json.loads(out.read_text())['variants']
    measured = {row['mode'] for row in variant['inference']}
    assert 'eager' in measured and not measured & set(PEERS)
