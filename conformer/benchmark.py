"""Inference and training benchmark of Conformer variants across execution modes.

Modes:

- ``eager``: the reference. The paper's computation op for op: explicit
  ``softmax(q @ k^T * scale) @ v`` attention, FCU-down convolving before it pools, unfused
  BatchNorm, NCHW, fp32, eager.
- ``fp32`` / ``bf16``: :func:`conformer.deploy.optimize_for_inference` (BN folded, SDPA,
  channels_last; bf16 autocast for ``bf16``; torch.compile with freezing under ``--compile``).
  For training: SDPA, channels_last, bf16 autocast for ``bf16``, torch.compile under ``--compile``.
- ``triton``: the Triton kernels on a CUDA device; reported as skipped without one.

``bf16`` is reported as skipped on a device without native bf16
(:func:`conformer.runtime.native_bf16`, e.g. AVX2-only CPUs such as AMD Zen 3), where PyTorch
emulates it several times slower than fp32: there is nothing to measure but emulation.

Speed-ups are medians of per-round time ratios against ``eager``, with all modes run in turn
within each round, so drifting machine load hits every mode alike. FLOPs are counted once per
batch size with ``FlopCounterMode`` (2 per multiply-add) in each mode's own op order; "% of
peak" compares the achieved rate to a large GEMM in the mode's dtype that runs in the same
rounds (the median of per-round rate ratios, like the speed-ups), by the fastest route
PyTorch has to a GEMM on this machine: on a CPU with oneDNN both ``a @ b`` and oneDNN's
inner product are timed at the start, since on AMD CPUs MKL's fp32 ``a @ b`` runs well below
what the cores can do.

Several variants (``--model conformer_tiny_patch16 conformer_base_patch16``) run one after the
other in one process, each at its own default input size unless ``--image-size`` is given;
the printed tables end with a summary of every mode's images/s per variant and batch size.

On CPU, ``--keep-freed-memory`` makes the process keep freed memory for reuse
(:func:`conformer.runtime.keep_freed_memory`, as the trainer does). Without it every mode
runs on glibc's defaults, as a user's process would, and the eager reference, which
allocates more large activations, pays more page faults than the deploy modes.
"""
import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import timm
import conformer  # noqa: F401  (registers the variants with timm)
from conformer.deploy import onednn_runs, optimize_for_inference
from conformer.kernels.fcu import fcu_down_reference
from conformer.layers import Attention, FCUDown
from conformer.models import check_model_name
from conformer.models.profile import count_flops
from conformer.outputs import writable_file
from conformer import runtime

__all__ = ['paper_attention_forward', 'reference_model', 'peak_memory_bytes', 'gemm_routes',
           'matmul_peak_gflops', 'cpu_description', 'unavailable', 'run', 'main']

SCHEMA = 'conformer-benchmark/2'
MODES = ('eager', 'fp32', 'bf16', 'triton')
NO_CUDA = 'skipped: no CUDA device'
NO_NATIVE_BF16 = 'skipped: no native bf16 on this device'
MEMORY_METHOD = (
    'CPU: peak of bytes live in the PyTorch CPU allocator during one call above the level at '
    'its start (torch.profiler allocation records, total_allocated); excludes weights already '
    'allocated and memory oneDNN allocates privately. CUDA: torch.cuda.max_memory_allocated '
    'minus the allocation at the start of the call.')


def paper_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention exactly as the paper's code computes it (explicit score matrix)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def paper_fcu_down_forward(self: FCUDown, x: torch.Tensor, x_t: torch.Tensor,
                           grid: Tuple[int, int]) -> torch.Tensor:
    """FCU-down in the paper's order (the kernels' PyTorch reference): the 1x1 conv on the
    full map, then the pooling."""
    tokens = fcu_down_reference(x, self.conv_project.weight, self.conv_project.bias, grid,
                                self.ln.weight, self.ln.bias, self.ln.eps)
    return torch.cat([x_t[:, :1], tokens], dim=1)


def reference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` running the paper's op order: :func:`paper_attention_forward` and
    :func:`paper_fcu_down_forward`."""
    reference = copy.deepcopy(model)
    paper_forward = {Attention: paper_attention_forward, FCUDown: paper_fcu_down_forward}
    for module in reference.modules():
        if type(module) in paper_forward:
            module.forward = types.MethodType(paper_forward[type(module)], module)
    return reference


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live when it started (see MEMORY_METHOD)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            allocations.append((node.start_time_ns, node.extra_fields))
    if not allocations:
        return 0
    allocations.sort(key=lambda a: a[0])
    first = allocations[0][1]
    start = first.total_allocated - first.alloc_size
    return max(a.total_allocated for _, a in allocations) - start


def gemm_routes(device: torch.device, dtype: torch.dtype) -> Tuple[str, ...]:
    """The ways PyTorch can run a ``dtype`` GEMM here: ``matmul`` (``a @ b``: MKL for fp32 on
    x86, whose fast paths are Intel-only) and, on CPUs where oneDNN runs the dtype, ``onednn``
    (its inner product on a pre-packed weight, the op the deploy path uses)."""
    if device.type == 'cpu' and onednn_runs(dtype):
        return ('matmul', 'onednn')
    return ('matmul',)


def gemm_call(dtype: torch.dtype, size: int, device: torch.device,
              route: str = 'matmul') -> Callable[[], object]:
    """A size^3 GEMM (2 * size^3 FLOP) by ``route`` (see :func:`gemm_routes`), warmed up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if route == 'onednn':
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), size)  # a @ b
        call = (lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, 'none', [], ''))
    else:
        call = (lambda: a @ b)
    call()
    return call


def matmul_peak_gflops(dtype: torch.dtype, size: int, repeats: int,
                       device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """The machine's matmul rate by each of :func:`gemm_routes`, in GFLOP/s: the median over
    ``repeats`` size^3 GEMMs, the routes interleaved. The yardstick for "% of peak" is the
    fastest route."""
    calls = {route: gemm_call(dtype, size, device, route)
             for route in gemm_routes(device, dtype)}
    times = _interleaved_times(calls, repeats, device)
    return {route: 2 * size ** 3 / statistics.median(t) / 1e9 for route, t in times.items()}


def cpu_description() -> str:
    """The CPU's model name, family/model numbers and its matmul instruction sets, from
    /proc/cpuinfo (``platform.processor()`` where that is missing). Cloud CPUs often report only
    "AMD EPYC"; the family tells the generations apart (25: Zen 3/4, 26: Zen 5), and with it
    the fp32 peak, which doubles from Zen 4's double-pumped AVX-512 to Zen 5's."""
    try:
        with open('/proc/cpuinfo') as f:
            info = dict(line.split(':', 1) for line in f.read().split('\n\n')[0].splitlines()
                        if ':' in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get('flags', '').split())
    isa = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {' '.join(isa) or 'no AVX2'})")


def _now(device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _train_step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   autocast_dtype: Optional[torch.dtype]) -> Callable[[], float]:
    """One AdamW step on the dual-head loss (mean of the two cross-entropies)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device_type = x.device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            conv_logits, trans_logits = model(x)
            loss = (F.cross_entropy(conv_logits.float(), target)
                    + F.cross_entropy(trans_logits.float(), target)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def unavailable(mode: str, device: torch.device) -> Optional[str]:
    """Why ``mode`` is not measured on ``device`` (None: it is)."""
    if mode == 'triton' and device.type != 'cuda':
        return NO_CUDA
    if mode == 'bf16' and not runtime.native_bf16(device):
        return NO_NATIVE_BF16
    return None


def _build_modes(model: nn.Module, modes: Sequence[str], compile: bool, device: torch.device,
                 training: bool) -> Dict[str, nn.Module]:
    """Each mode's model, for the modes this machine runs (see :func:`unavailable`)."""
    built = {}
    for mode in modes:
        if unavailable(mode, device):
            continue
        if mode == 'eager':
            built[mode] = reference_model(model).to(device)
        elif training:
            m = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
            built[mode] = torch.compile(m) if compile else m
        elif mode == 'triton':
            built[mode] = copy.deepcopy(model).to(device).eval()
        else:
            dtype = torch.bfloat16 if mode == 'bf16' else torch.float32
            built[mode] = optimize_for_inference(model.to(device), dtype=dtype, compile=compile)
    return built


def _kernel_backend(mode: str):
    """The Triton backend for ``triton`` mode; the default dispatch otherwise."""
    if mode != 'triton':
        from contextlib import nullcontext
        return nullcontext()
    from conformer.kernels import use_backend
    return use_backend('triton')


def _interleaved_times(calls: Dict[str, Callable[[], object]], rounds: int,
                       device: torch.device) -> Dict[str, List[float]]:
    times = {mode: [] for mode in calls}
    for _ in range(rounds):
        for mode, call in calls.items():
            start = _now(device)
            call()
            times[mode].append(_now(device) - start)
    return times


def _ratio_median(reference: List[float], times: List[float]) -> float:
    return statistics.median(r / t for r, t in zip(reference, times))


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def bench_inference(model: nn.Module, modes: Sequence[str], batch_sizes: Sequence[int],
                    image_size: int, rounds: int, warmup: int, compile: bool,
                    device: torch.device, gemm_size: int,
                    peak_routes: Dict[str, str]) -> List[dict]:
    """``peak_routes``: dtype name -> the GEMM route timed in each round as the peak."""
    model = model.eval()
    gemm_flops = 2 * gemm_size ** 3
    gemms = {f'gemm_{dt}': gemm_call(getattr(torch, dt), gemm_size, device, route)
             for dt, route in peak_routes.items()}
    built = _build_modes(model, modes, compile, device, training=False)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        # the paper's op order costs more than the pool-first FCU-down every other mode runs
        flops = dict(eager=count_flops(built['eager'], x), other=count_flops(model, x))
        print(f'inference batch {batch}: {flops["eager"] / 1e9:.2f} GFLOP per call in the '
              f'paper\'s op order, {flops["other"] / 1e9:.2f} pooling first', file=sys.stderr)
        with torch.no_grad():
            expected = built['eager'](x)
        calls, compile_s = {}, {}
        for mode, m in built.items():
            call = (lambda m=m, mode=mode: _with_backend(mode, lambda: m(x)))
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(warmup):
                    call()
            compile_s[mode] = time.perf_counter() - start
            calls[mode] = call
        with torch.no_grad():
            times = _interleaved_times({**calls, **gemms}, rounds, device)
        for mode in modes:
            row = dict(mode=mode, batch=batch)
            if mode not in calls:
                rows.append(dict(row, status=unavailable(mode, device)))
                continue
            with torch.no_grad():
                logits = calls[mode]()
                memory = peak_memory_bytes(calls[mode], device)
            p50 = statistics.median(times[mode])
            gemm_times = times['gemm_bfloat16' if mode == 'bf16' else 'gemm_float32']
            mode_flops = flops['eager' if mode == 'eager' else 'other']
            rows.append(dict(
                row, status='ok',
                images_per_s=batch / p50,
                latency_ms_p50=1e3 * p50,
                latency_ms_p90=1e3 * _percentile(times[mode], 0.9),
                peak_memory_mb=memory / 2 ** 20,
                gflop_per_call=mode_flops / 1e9,
                achieved_gflops=mode_flops / p50 / 1e9,
                matmul_peak_gflops=gemm_flops / statistics.median(gemm_times) / 1e9,
                pct_of_matmul_peak=100 * _ratio_median(
                    [t / gemm_flops for t in gemm_times], [t / mode_flops for t in times[mode]]),
                speedup_vs_eager=_ratio_median(times['eager'], times[mode]),
                max_abs_logit_diff=(logits.float() - expected).abs().max().item(),
                top1_agreement=(logits.argmax(-1) == expected.argmax(-1)).float().mean().item(),
                warmup_s=compile_s[mode],
                times_ms=[1e3 * t for t in times[mode]],
            ))
    return rows


def _with_backend(mode: str, fn: Callable[[], object]) -> object:
    with _kernel_backend(mode):
        return fn()


def bench_training(model: nn.Module, modes: Sequence[str], batch: int, image_size: int,
                   rounds: int, warmup: int, compile: bool, device: torch.device) -> List[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    target = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)
    rows = []
    for checkpointing in (False, True):
        model.train().set_grad_checkpointing(checkpointing)
        model.set_dual_head_training(True)
        built = _build_modes(model, modes, compile, device, training=True)
        print(f'training batch {batch}, checkpointing={checkpointing}', file=sys.stderr)
        steps, first_loss, warm_s = {}, {}, {}
        for mode, m in built.items():
            autocast = torch.bfloat16 if mode == 'bf16' else None
            inputs = x if mode == 'eager' else x.contiguous(memory_format=torch.channels_last)
            step = _train_step_fn(m, inputs, target, autocast)
            steps[mode] = (lambda step=step, mode=mode: _with_backend(mode, step))
            start = time.perf_counter()
            first_loss[mode] = steps[mode]()  # same weights and batch in every mode
            for _ in range(warmup - 1):
                steps[mode]()
            warm_s[mode] = time.perf_counter() - start
        times = _interleaved_times(steps, rounds, device)
        for mode in modes:
            row = dict(mode=mode, batch=batch, grad_checkpointing=checkpointing)
            if mode not in steps:
                rows.append(dict(row, status=unavailable(mode, device)))
                continue
            p50 = statistics.median(times[mode])
            rows.append(dict(
                row, status='ok',
                images_per_s=batch / p50,
                step_ms_p50=1e3 * p50,
                step_ms_p90=1e3 * _percentile(times[mode], 0.9),
                peak_memory_mb=peak_memory_bytes(steps[mode], device) / 2 ** 20,
                speedup_vs_eager=_ratio_median(times['eager'], times[mode]),
                first_loss=first_loss[mode],
                loss_abs_diff_vs_eager=abs(first_loss[mode] - first_loss['eager']),
                warmup_s=warm_s[mode],
            ))
    model.set_grad_checkpointing(False)
    model.set_dual_head_training(False)
    by_key = {(r['mode'], r['grad_checkpointing']): r for r in rows}
    for r in rows:
        if r['grad_checkpointing'] and r['status'] == 'ok':
            r['memory_saved_pct'] = 100 * (1 - r['peak_memory_mb']
                                           / by_key[(r['mode'], False)]['peak_memory_mb'])
    return rows


def run(variants: Sequence[str], batch_sizes: Sequence[int], train_batch: int,
        image_size: Optional[int], rounds: int, warmup: int, compile: bool,
        modes: Sequence[str] = MODES, gemm_size: int = 2048, skip_training: bool = False,
        model_kwargs: Optional[dict] = None, keep_freed_memory: bool = False) -> dict:
    """Run the whole benchmark for each of ``variants`` (at ``image_size``, or each variant's
    default input size when None); returns the JSON-ready result."""
    if 'eager' not in modes:
        raise ValueError("modes must include 'eager': every speed-up is measured against it")
    if rounds < 1 or warmup < 1:
        raise ValueError(f'rounds and warmup must be >= 1, got rounds={rounds}, warmup={warmup}')
    if not variants:
        raise ValueError('pass at least one model to benchmark')
    for name in variants:
        check_model_name(name)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if keep_freed_memory and device.type == 'cpu':
        runtime.keep_freed_memory()
    dtypes = [torch.float32]  # every mode's peak: eager and fp32 run in it
    if 'bf16' in modes and not unavailable('bf16', device):
        dtypes.append(torch.bfloat16)
    route_gflops = {str(dt).removeprefix('torch.'): matmul_peak_gflops(dt, gemm_size,
                                                                       max(3, rounds), device)
                    for dt in dtypes}
    peak_routes = {dt: max(rates, key=rates.get) for dt, rates in route_gflops.items()}
    result = dict(
        schema=SCHEMA,
        machine=dict(platform=platform.platform(), cpu=cpu_description(),
                     torch=torch.__version__, threads=torch.get_num_threads(),
                     device=str(device), omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'),
                     load_average_at_start=os.getloadavg()),
        settings=dict(variants=list(variants), image_size=image_size,
                      batch_sizes=list(batch_sizes), train_batch=train_batch, rounds=rounds,
                      warmup=warmup, compile=compile, modes=list(modes), gemm_size=gemm_size,
                      keep_freed_memory=keep_freed_memory),
        matmul_peak_gflops={dt: route_gflops[dt][route] for dt, route in peak_routes.items()},
        matmul_peak_route=peak_routes,
        matmul_route_gflops=route_gflops,
        memory_method=MEMORY_METHOD,
        variants=[],
    )
    for name in variants:
        torch.manual_seed(0)
        model = timm.create_model(name, **(model_kwargs or {}))
        size = image_size or model.pretrained_cfg['input_size'][-1]
        _calibrate_batchnorm(model, size)
        result['variants'].append(dict(
            variant=name, image_size=size,
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            inference=bench_inference(model, modes, batch_sizes, size, rounds, warmup,
                                      compile, device, gemm_size, peak_routes),
            training=[] if skip_training else bench_training(
                model, modes, train_batch, size, rounds, warmup, compile, device),
        ))
    result['machine']['load_average_at_end'] = os.getloadavg()
    return result


def _calibrate_batchnorm(model: nn.Module, image_size: int) -> None:
    """Give BatchNorm realistic running statistics (a randomly initialised model's are 0/1,
    which makes its activations, and so the logit tolerances, blow up)."""
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
        for _ in range(2):
            model(torch.randn(4, 3, image_size, image_size, generator=generator))
    model.eval()


def format_table(result: dict) -> str:
    """Markdown tables: each variant's inference and training rows and, for several variants,
    a summary with one row per variant and batch size."""
    s = result['settings']
    short = dict(float32='fp32', bfloat16='bf16')
    peaks = ', '.join(
        f"{short[dt]} "
        + ' / '.join(f'{rate:.0f} ({route})' for route, rate in rates.items())
        for dt, rates in result['matmul_route_gflops'].items())
    lines = [f"{result['machine']['cpu']}, {result['machine']['threads']} threads, "
             f"compile={s['compile']}, keep_freed_memory={s['keep_freed_memory']}; "
             f"GEMM GFLOP/s at start {peaks}, the faster route is the peak; speed-up and "
             f"% peak = medians of ratios interleaved in each round"]
    for v in result['variants']:
        lines += ['', f"{v['variant']} @ {v['image_size']}px ({v['params_m']:.2f}M parameters)"]
        lines += _inference_table(v['inference']) + _training_table(v['training'])
    if len(result['variants']) > 1:
        lines += _summary_table(result['variants'])
    return '\n'.join(lines)


def _markdown(header: Sequence[str], rows: List[dict], keys: Sequence[str],
              cells: Callable[[dict], List[str]]) -> List[str]:
    """A table: each row's ``keys`` values, then ``cells(row)``, or its status if skipped."""
    if not rows:
        return []
    lines = ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        row = [str(r[k]) for k in keys]
        row += cells(r) if r['status'] == 'ok' else [r['status']] + [''] * (
            len(header) - len(keys) - 1)
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def _inference_table(rows: List[dict]) -> List[str]:
    return _markdown(
        ('mode', 'batch', 'img/s', 'p50 ms', 'p90 ms', 'peak MB', 'GFLOP/s', '% peak',
         'speed-up', 'max abs diff'), rows, ('mode', 'batch'),
        lambda r: [f"{r['images_per_s']:.3g}", f"{r['latency_ms_p50']:.0f}",
                   f"{r['latency_ms_p90']:.0f}", f"{r['peak_memory_mb']:.0f}",
                   f"{r['achieved_gflops']:.0f}", f"{r['pct_of_matmul_peak']:.0f}%",
                   f"{r['speedup_vs_eager']:.2f}x", f"{r['max_abs_logit_diff']:.1e}"])


def _training_table(rows: List[dict]) -> List[str]:
    return _markdown(
        ('train mode', 'batch', 'checkpointing', 'img/s', 'step ms', 'peak MB', 'memory saved',
         'speed-up', 'loss diff'), rows, ('mode', 'batch', 'grad_checkpointing'),
        lambda r: [f"{r['images_per_s']:.3g}", f"{r['step_ms_p50']:.0f}",
                   f"{r['peak_memory_mb']:.0f}",
                   f"{r['memory_saved_pct']:.0f}%" if 'memory_saved_pct' in r else '',
                   f"{r['speedup_vs_eager']:.2f}x", f"{r['loss_abs_diff_vs_eager']:.1e}"])


def _summary_table(variants: List[dict]) -> List[str]:
    """img/s of every measured mode (speed-up over eager in brackets) per variant and batch."""
    modes = [m for m in MODES if any(r['mode'] == m and r['status'] == 'ok'
                                     for v in variants for r in v['inference'])]
    rows = []
    for v in variants:
        for batch in dict.fromkeys(r['batch'] for r in v['inference']):
            runs = {r['mode']: r for r in v['inference'] if r['batch'] == batch}
            rows.append(dict(model=v['variant'], params=f"{v['params_m']:.2f}", batch=batch,
                             status='ok', runs=[runs[m] for m in modes]))

    def rate(r: dict) -> str:
        if r['status'] != 'ok':
            return ''
        return f"{r['images_per_s']:.3g}" + (
            '' if r['mode'] == 'eager' else f" ({r['speedup_vs_eager']:.2f}x)")

    return _markdown(('model', 'params (M)', 'batch', *(f'{m} img/s' for m in modes)), rows,
                     ('model', 'params', 'batch'), lambda row: [rate(r) for r in row['runs']])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description='Benchmark Conformer variants: eager reference vs deploy modes '
                    '(set OMP_WAIT_POLICY=ACTIVE for stable CPU timings).')
    parser.add_argument('--model', nargs='+',
                        help='one or more registered variants, benchmarked in turn '
                             '(default: conformer_small_patch16)')
    parser.add_argument('--batch-sizes', type=int, nargs='*',
                        help='inference batch sizes (default: 1 8 32; none: skip inference)')
    parser.add_argument('--train-batch', type=int, help='training batch size (default: 8)')
    parser.add_argument('--image-size', type=int,
                        help="input size (default: each model's pretrained_cfg size, 224 px "
                             "for the paper's variants)")
    parser.add_argument('--rounds', type=int, help='timed rounds per config (default: 9)')
    parser.add_argument('--warmup', type=int, help='untimed calls per config (default: 2)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the fp32/bf16 modes (inductor freezing for inference)')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--skip-training', action='store_true')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='CPU: keep freed memory for reuse instead of glibc handing it back '
                             '(as the trainer does), so no mode pays page faults')
    parser.add_argument('--threads', type=int,
                        help="intra-op threads (default: torch's, one per core); 1 gives steadier "
                             "ratios when other jobs share the cores")
    parser.add_argument('--json', default='benchmark.json', help='where to write the results')
    parser.add_argument('--smoke', action='store_true',
                        help='a seconds-long run on a tiny model (for CI): checks the tool, '
                             'not the speed')
    args = parser.parse_args(argv)
    for flag, value in (('--threads', args.threads), ('--train-batch', args.train_batch),
                        ('--image-size', args.image_size), ('--rounds', args.rounds),
                        ('--warmup', args.warmup),
                        *(('--batch-sizes', b) for b in args.batch_sizes or ())):
        if value is not None and value < 1:
            parser.error(f'{flag} must be >= 1, got {value}')
    if args.smoke and (args.model or args.batch_sizes or args.image_size or args.rounds
                       or args.warmup or args.train_batch):
        parser.error('--smoke picks its own tiny model, sizes and rounds; drop --model, '
                     '--batch-sizes, --image-size, --rounds, --warmup and --train-batch')
    defaults = dict(model=['conformer_small_patch16'], batch_sizes=[1, 8, 32], rounds=9,
                    warmup=2, train_batch=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.batch_sizes and args.skip_training:
        parser.error('nothing to measure: --batch-sizes is empty and --skip-training is set')
    try:
        out = writable_file(args.json, '--json')
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kwargs = dict(variants=args.model, batch_sizes=args.batch_sizes,
                  train_batch=args.train_batch, image_size=args.image_size, rounds=args.rounds,
                  warmup=args.warmup, compile=args.compile, modes=args.modes,
                  skip_training=args.skip_training, keep_freed_memory=args.keep_freed_memory)
    if args.smoke:
        kwargs.update(variants=['conformer_nano_patch4'], batch_sizes=[1, 2], train_batch=2,
                      image_size=32, rounds=2, warmup=1, gemm_size=256,
                      model_kwargs=dict(num_classes=10))
    try:
        result = run(**kwargs)
    except ValueError as e:  # a model name, an image size the model cannot take, ...
        parser.error(str(e))
    print(format_table(result))
    out.write_text(json.dumps(result, indent=1))
    print(f'wrote {out}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
