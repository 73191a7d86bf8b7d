"""Benchmark the Triton kernels of conformer.kernels against PyTorch on Conformer's shapes.

Targets on an H100 SXM, bf16 (also written into the JSON):
- attention: the fused forward at least matches torch SDPA at 197 tokens (B=64, heads 6 and 9,
  D=64);
- conv_bn_act: conv + BN + residual + ReLU at least 1.2x the unfused eager
  F.conv2d -> F.batch_norm -> add -> ReLU (cuDNN) at batch 64, on Conformer-S's ConvBlock shapes;
- whole-model bf16 inference at least 1.3x eager: a "model" suite will join SUITES below.

Each case times the Triton path and its PyTorch baseline (triton.testing.do_bench medians on a
GPU) and reports TFLOP/s, GB/s (minimum traffic: every input read once, every output written
once), their percentage of the device's dense 16-bit tensor-core peak and memory bandwidth
(blank for devices missing from PEAKS and for fp32), the speed-up over the baseline and the
largest absolute difference between the two outputs. FLOPs count the arithmetic the fused
algorithm needs (FCU-down pools before its GEMM), so both rows of a case divide the same work;
attention forward+backward counts 3.5x the forward, as the FlashAttention benchmarks do.

``--smoke`` runs tiny fp32 shapes on CPU through the Triton interpreter (CPU timer, medians) so
CI exercises this script; its timings mean nothing.

``--compile-only`` needs no GPU: it compiles every kernel with every config its autotuner can
choose for sm_80 and sm_90, fp16/bf16/fp32 (fp32 with TF32 and with IEEE dots) and attention
head dims 32/64/96/128 at Conformer's shapes (conformer.kernels.compile_check), prints
kernel | arch | dtype | config | regs | smem | spills, writes them as JSON, and exits 1 if a
config fails to compile or a case keeps no config that fits in shared memory.

    python tools/bench_kernels.py --out bench.json            # on a GPU
    python tools/bench_kernels.py --smoke --out /tmp/b.json   # anywhere
    python tools/bench_kernels.py --compile-only --out compile.json  # anywhere, minutes
"""

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

TARGETS = {
    'attention': 'fused forward >= torch SDPA at 197 tokens (H100 SXM, bf16)',
    'conv': 'conv+BN+residual+ReLU >= 1.2x unfused eager at batch 64 (H100 SXM, bf16)',
    'model': 'whole-model bf16 inference >= 1.3x eager (H100 SXM)',
}

# Device-name fragment -> (dense 16-bit tensor-core TFLOP/s, memory GB/s); first match wins.
PEAKS = {
    'H100 PCIe': (756.0, 2000.0),
    'H100': (989.0, 3350.0),  # SXM5, HBM3
    'A100': (312.0, 2039.0),  # 80 GB SXM4
    'L40S': (362.0, 864.0),
    'L4': (121.0, 300.0),
}


@dataclass
class Case:
    suite: str
    name: str
    flops: float
    bytes: float
    triton: Callable  # the conformer.kernels call, backend="triton"
    baseline: Callable  # what the model would run without the kernel
    baseline_name: str
    needs_grad: bool = False  # time it with autograd on (a backward pass)


def attention_cases(device, dtype, batch, smoke):
    from conformer.kernels import attention

    shapes = [(batch, 2, 50, 64)] if smoke else [(batch, 6, 197, 64), (batch, 9, 197, 64)]
    cases = []
    for B, H, N, D in shapes:
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
        flops, size = 4 * B * H * N * N * D, B * H * N * D * q.element_size()
        name = f'B{B} H{H} N{N} D{D}'
        cases.append(Case('attention', f'fwd {name}', flops, 4 * size,
                          lambda q=q, k=k, v=v: attention(q, k, v, backend='triton'),
                          lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                          'torch sdpa'))

        def fwd_bwd(fn, inputs=(q, k, v), grad_out=torch.randn_like(q)):
            leaves = [t.detach().requires_grad_() for t in inputs]
            return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)

        cases.append(Case('attention', f'fwd+bwd {name}', 3.5 * flops, 12 * size,
                          fwd_bwd(lambda q, k, v: attention(q, k, v, backend='triton')),
                          fwd_bwd(F.scaled_dot_product_attention), 'torch sdpa', needs_grad=True))
    return cases


# Conformer-S at 224 px, per stage: (H, C_in, C_out, kernel, stride, residual). ConvBlock is
# 1x1 reduce -> 3x3 (stride 2 where a stage starts) -> 1x1 expand + residual, all with ReLU.
CONV_SHAPES = [
    (56, 256, 64, 1, 1, False), (56, 64, 64, 3, 1, False), (56, 64, 256, 1, 1, True),
    (56, 128, 128, 3, 2, False), (28, 512, 128, 1, 1, False), (28, 128, 128, 3, 1, False),
    (28, 128, 512, 1, 1, True),
    (28, 256, 256, 3, 2, False), (14, 1024, 256, 1, 1, False), (14, 256, 256, 3, 1, False),
    (14, 256, 1024, 1, 1, True),
]
CONV_SMOKE_SHAPES = [(7, 24, 40, 3, 1, False), (13, 24, 24, 3, 2, False), (7, 40, 24, 1, 1, True)]


def conv_cases(device, dtype, batch, smoke):
    from conformer.kernels import conv_bn_act

    cases = []
    for H, C_in, C_out, k, stride, residual in CONV_SMOKE_SHAPES if smoke else CONV_SHAPES:
        B, H_out = batch, (H - 1) // stride + 1
        def nhwc(*shape):
            return torch.randn(shape, device=device, dtype=dtype).to(
                memory_format=torch.channels_last)

        x = nhwc(B, C_in, H, H)
        weight = nhwc(C_out, C_in, k, k) / (C_in * k * k) ** 0.5
        res = nhwc(B, C_out, H_out, H_out) if residual else None
        mean, var, gamma, beta = (torch.rand(C_out, device=device) + 0.5 for _ in range(4))
        scale = gamma / torch.sqrt(var + 1e-6)
        shift = beta - mean * scale

        def eager(x=x, weight=weight, res=res, bn=(mean, var, gamma, beta), stride=stride, k=k):
            y = F.batch_norm(F.conv2d(x, weight, stride=stride, padding=k // 2), bn[0], bn[1],
                             bn[2], bn[3], False, 0.0, 1e-6)
            return F.relu(y if res is None else y + res)

        elt = x.element_size()
        traffic = (x.numel() + weight.numel() + B * C_out * H_out**2 * (2 if residual else 1)) * elt
        name = f"B{B} {H}x{H} {C_in}->{C_out} k{k} s{stride}{' +res' if residual else ''}"
        cases.append(Case('conv', name,
                          2 * B * H_out**2 * C_out * C_in * k * k, traffic,
                          lambda x=x, w=weight, s=scale, t=shift, st=stride, r=res:
                          conv_bn_act(x, w, s, t, st, r, backend='triton'),
                          eager, 'eager conv+bn+add+relu'))
    return cases


# Conformer-S at 224 px: CNN map (H, channels) <-> 14x14 tokens of width 384, per stage.
FCU_SHAPES = [(56, 64, 384, 14), (28, 128, 384, 14), (14, 256, 384, 14)]
FCU_SMOKE_SHAPES = [(8, 24, 40, 2)]


def fcu_cases(device, dtype, batch, smoke):
    from conformer.kernels import fcu_down, fcu_up
    from conformer.kernels.fcu import fcu_down_reference, fcu_up_reference

    cases = []
    for H, C_map, C_tok, G in FCU_SMOKE_SHAPES if smoke else FCU_SHAPES:
        B, L = batch, G * G
        new = dict(device=device, dtype=dtype)
        x = torch.randn(B, C_map, H, H, **new).to(memory_format=torch.channels_last)
        w_down = torch.randn(C_tok, C_map, 1, 1, **new) * 0.05
        w_up = torch.randn(C_map, C_tok, 1, 1, **new) * 0.05
        b_down, b_up, ln_w, ln_b = (torch.randn(n, **new) for n in (C_tok, C_map, C_tok, C_tok))
        scale, shift = torch.rand(C_map, device=device) + 0.5, torch.randn(C_map, device=device)
        tokens = torch.randn(B, L, C_tok, **new)
        down = (x, w_down, b_down, (G, G), ln_w, ln_b, 1e-6)
        up = (tokens, (G, G), w_up, b_up, scale, shift, (H, H), x)
        elt, name = x.element_size(), f'B{B} {H}x{H}x{C_map} <-> {G}x{G}x{C_tok}'
        cases.append(Case('fcu', f'down {name}', 2 * B * L * C_map * C_tok,
                          (x.numel() + w_down.numel() + B * L * C_tok) * elt,
                          lambda a=down: fcu_down(*a, backend='triton'),
                          lambda a=down: fcu_down_reference(*a),
                          'eager pool+conv+ln+gelu'))
        cases.append(Case('fcu', f'up {name}', 2 * B * L * C_map * C_tok,
                          (tokens.numel() + w_up.numel() + 2 * x.numel()) * elt,
                          lambda a=up: fcu_up(*a, backend='triton'),
                          lambda a=up: fcu_up_reference(*a),
                          'eager conv+bn+relu+upsample+add'))
    return cases


SUITES = {'attention': attention_cases, 'conv': conv_cases, 'fcu': fcu_cases}


def measure_ms(fn, on_gpu, reps):
    """Median milliseconds per call: CUDA events via do_bench on a GPU, a CPU timer otherwise."""
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    fn()  # warm-up (compiles, fills caches)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_abs_err(a, b):
    a, b = (a, b) if isinstance(a, (tuple, list)) else ((a,), (b,))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def device_peaks(name):
    return next((peak for fragment, peak in PEAKS.items() if fragment in name), None)


def run(args):
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = 'cuda' if on_gpu else 'cpu'
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name() if on_gpu else 'cpu (Triton interpreter)'
    peaks = device_peaks(device_name) if on_gpu and dtype != torch.float32 else None
    rows = []
    with torch.no_grad():
        cases = [case for suite in args.suites
                 for case in SUITES[suite](device, dtype, args.batch, args.smoke)]
    for case in cases:
        with torch.enable_grad() if case.needs_grad else torch.no_grad():
            err = max_abs_err(case.triton(), case.baseline())
            times = {'triton': measure_ms(case.triton, on_gpu, args.reps),
                     case.baseline_name: measure_ms(case.baseline, on_gpu, args.reps)}
        for impl, ms in times.items():
            tflops, gbs = case.flops / ms / 1e9, case.bytes / ms / 1e6
            rows.append(dict(
                suite=case.suite, case=case.name, impl=impl, ms=ms, tflops=tflops, gbs=gbs,
                pct_peak_flops=None if peaks is None else 100 * tflops / peaks[0],
                pct_peak_bw=None if peaks is None else 100 * gbs / peaks[1],
                speedup=times[case.baseline_name] / ms if impl == 'triton' else None,
                max_abs_err=err))
    return dict(device=device_name, interpreter=not on_gpu,
                dtype=str(dtype).removeprefix('torch.'), batch=args.batch,
                peaks=None if peaks is None else dict(tflops=peaks[0], gbs=peaks[1]),
                targets=TARGETS, results=rows)


def _blank_or(value, spec=''):
    return '' if value is None else format(value, spec)


def print_table(report):
    header = f"{'suite':<9} {'case':<44} {'impl':<32} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} " \
             f"{'%flops':>6} {'%bw':>5} {'speedup':>7} {'max err':>8}"
    print(f"{report['device']}, {report['dtype']}")
    print(header)
    print('-' * len(header))
    for r in report['results']:
        print(f"{r['suite']:<9} {r['case']:<44} {r['impl']:<32} {r['ms']:>9.3f} "
              f"{r['tflops']:>8.2f} {r['gbs']:>8.1f} {_blank_or(r['pct_peak_flops'], '.1f'):>6} "
              f"{_blank_or(r['pct_peak_bw'], '.1f'):>5} {_blank_or(r['speedup'], '.2f'):>7} "
              f"{r['max_abs_err']:>8.1e}")


def compile_only(args):
    """Compile the matrix on CPU; the report and whether every case has a config that fits."""
    from conformer.kernels import compile_check

    jobs = compile_check.jobs(archs=args.archs, dtypes=args.dtypes, head_dims=args.head_dims)
    print(f'compiling {len(jobs)} kernel configs on {args.workers} processes')
    results = compile_check.run_jobs(jobs, workers=args.workers, fresh=True)
    kept = compile_check.kept_configs(results)
    header = f"{'kernel':<44} {'arch':<5} {'dtype':<14} {'config':<48} {'regs':>4} " \
             f"{'smem':>7} {'spills':>6}"
    print(header)
    print('-' * len(header))
    for r in results:
        dtype = r['dtype'] + ('/ieee' if r['precision'] == 'ieee' else '')
        print(f"{r['case']:<44} sm_{r['arch']:<2} {dtype:<14} {r['config_name']:<48} "
              f"{_blank_or(r['regs']):>4} {_blank_or(r['shared']):>7} {_blank_or(r['spills']):>6}"
              + ('' if r['error'] is None else f"  FAILED {r['error'].splitlines()[0]}"))
    homeless = [' '.join(map(str, key)) for key, (_, fits) in kept.items() if not fits]
    for case in homeless:
        print(f'no config fits in shared memory: {case}')
    ok = not homeless and all(r['error'] is None for r in results)
    return dict(compile=results, ok=ok)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='bench_kernels.json',
                        help='where to write the JSON report')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny fp32 shapes on CPU through the Triton interpreter (for CI)')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--batch', type=int, default=None,
                        help='batch size (default 64; 1 with --smoke)')
    parser.add_argument('--suites', nargs='+', default=list(SUITES), choices=list(SUITES))
    parser.add_argument('--reps', type=int, default=3, help='timed calls per measurement on CPU')
    parser.add_argument('--compile-only', action='store_true',
                        help='compile every kernel config for sm_80/sm_90 on CPU; no timing')
    parser.add_argument('--archs', nargs='+', type=int, default=[80, 90], choices=[80, 90],
                        help='--compile-only: GPU architectures')
    parser.add_argument('--dtypes', nargs='+', default=['float16', 'bfloat16', 'float32'],
                        choices=['float16', 'bfloat16', 'float32'], help='--compile-only: dtypes')
    parser.add_argument('--head-dims', nargs='+', type=int, default=[32, 64, 96, 128],
                        choices=[32, 64, 96, 128], help='--compile-only: attention head dims')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='--compile-only: compiling processes')
    args = parser.parse_args(argv)
    if args.compile_only:
        report = compile_only(args)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'wrote {args.out}')
        return 0 if report['ok'] else 1
    if args.batch is None:
        args.batch = 1 if args.smoke else 64
    if args.smoke:
        # Triton picks the interpreter when conformer.kernels is first imported, i.e. after this.
        os.environ['TRITON_INTERPRET'] = '1'
    elif not torch.cuda.is_available():
        parser.error('no CUDA device: run on a GPU, or pass --smoke to exercise the script on CPU')
    report = run(args)
    print_table(report)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    sys.exit(main())
