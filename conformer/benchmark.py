"""Inference and training benchmark of Conformer variants across execution modes: the timing
harness behind ``conformer-benchmark`` (:mod:`conformer.cli.benchmark` prints its tables).

Modes:

- ``eager``: the reference. Every op on its PyTorch reference in :mod:`conformer.kernels`
  (:func:`reference_model`: kernel backend ``'torch'``), BatchNorm unfolded, NCHW, fp32.
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
PyTorch has to a GEMM where it runs: on a CPU with oneDNN both ``a @ b`` and oneDNN's
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
import copy
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

import conformer  # noqa: F401  (registers the variants with timm)
from conformer import runtime
from conformer.deploy import optimize_for_inference
from conformer.engine.evaluate import dual_head_loss
from conformer.kernels import onednn
from conformer.models import check_model_name
from conformer.models.profile import count_flops

__all__ = ['MODES', 'reference_model', 'peak_memory_bytes', 'gemm_routes', 'gemm_call',
           'matmul_peak_gflops', 'unavailable', 'bench_inference', 'bench_training', 'run']

SCHEMA = 'conformer-benchmark/2'
MODES = ('eager', 'fp32', 'bf16', 'triton')
NO_CUDA = 'skipped: no CUDA device'
NO_NATIVE_BF16 = 'skipped: no native bf16 on this device'
MEMORY_METHOD = (
    'CPU: peak of bytes live in the PyTorch CPU allocator during one call above the level at '
    'its start (torch.profiler allocation records, total_allocated); excludes weights already '
    'allocated and memory oneDNN allocates privately. CUDA: torch.cuda.max_memory_allocated '
    'minus the allocation at the start of the call.')


def reference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` pinned to the kernels' PyTorch references (kernel backend
    ``'torch'``), so the ``eager`` baseline is the same computation on every device and whatever
    backend is the default.

    Args:
        model: a Conformer; not modified.
    """
    reference = copy.deepcopy(model)
    reference.set_kernel_backend('torch')
    return reference


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live when it started (see MEMORY_METHOD).

    Args:
        fn: the call to measure; run once.
        device: where it allocates, CPU or CUDA.
    """
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
    """The ways PyTorch can run a ``dtype`` GEMM on ``device``: ``matmul`` (``a @ b``: MKL for
    fp32 on x86, whose fast paths are Intel-only) and, on CPUs where oneDNN runs the dtype,
    ``onednn`` (:func:`conformer.kernels.onednn.linear`: its inner product on a packed weight,
    as deploy runs linears).

    Args:
        device: the device the GEMM runs on.
        dtype: the GEMM's dtype.
    """
    if device.type == 'cpu' and onednn.takes_dtype(dtype):
        return ('matmul', 'onednn')
    return ('matmul',)


def gemm_call(dtype: torch.dtype, size: int, device: torch.device,
              route: str = 'matmul') -> Callable[[], object]:
    """A size^3 GEMM (2 * size^3 FLOP) by ``route`` (see :func:`gemm_routes`), warmed up.

    Args:
        dtype: the GEMM's dtype.
        size: rows and columns of the square operands.
        device: the device it runs on.
        route: 'matmul' or 'onednn'.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if route == 'onednn':
        call = partial(onednn.linear, a, b.t().contiguous())  # a @ b, the weight packed once
    else:
        call = partial(torch.matmul, a, b)
    call()
    return call


def matmul_peak_gflops(dtype: torch.dtype, size: int, repeats: int,
                       device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """The machine's matmul rate by each of :func:`gemm_routes`, in GFLOP/s: the median over
    ``repeats`` size^3 GEMMs, the routes interleaved. The yardstick for "% of peak" is the
    fastest route.

    Args:
        dtype: the GEMM's dtype.
        size: rows and columns of the square operands.
        repeats: GEMMs timed per route.
        device: the device they run on.
    """
    calls = {route: gemm_call(dtype, size, device, route)
             for route in gemm_routes(device, dtype)}
    times = _interleaved_times(calls, repeats, device)
    return {route: 2 * size ** 3 / statistics.median(t) / 1e9 for route, t in times.items()}


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
            loss = dual_head_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def unavailable(mode: str, device: torch.device) -> Optional[str]:
    """Why ``mode`` is not measured on ``device`` (None: it is).

    Args:
        mode: one of :data:`MODES`.
        device: the benchmark's device.
    """
    if mode == 'triton' and device.type != 'cuda':
        return NO_CUDA
    if mode == 'bf16' and not runtime.native_bf16(device):
        return NO_NATIVE_BF16
    return None


def _build_modes(model: nn.Module, modes: Sequence[str], compile: bool, device: torch.device,
                 training: bool) -> Dict[str, nn.Module]:
    """Each mode's model, for the modes the device can run (see :func:`unavailable`)."""
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
    """Inference rows, one per mode and batch size: latency, throughput, peak memory, % of
    matmul peak, speed-up over ``eager`` and logit agreement with it.

    Args:
        model: the Conformer; put in eval mode.
        modes: modes to run, from :data:`MODES`; must include ``'eager'``.
        batch_sizes: batch sizes to measure.
        image_size: height and width of the random input, in pixels.
        rounds: timed calls per mode, the modes interleaved.
        warmup: untimed calls per mode first (these include compiling).
        compile: deploy the fp32 and bf16 modes with ``torch.compile``.
        device: where to run.
        gemm_size: size of the square GEMM timed as the matmul peak.
        peak_routes: dtype name -> the GEMM route timed in each round as the peak.
    """
    model = model.eval()
    gemm_flops = 2 * gemm_size ** 3
    gemms = {f'gemm_{dt}': gemm_call(getattr(torch, dt), gemm_size, device, route)
             for dt, route in peak_routes.items()}
    built = _build_modes(model, modes, compile, device, training=False)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        # each mode's FLOPs in its own op order: the eager references' and the model's
        flops = dict(eager=count_flops(built['eager'], x), other=count_flops(model, x))
        print(f'inference batch {batch}: {flops["eager"] / 1e9:.2f} GFLOP per call in the '
              f'eager reference, {flops["other"] / 1e9:.2f} in the model', file=sys.stderr)
        with torch.no_grad():
            expected = built['eager'](x)
        calls, compile_s = {}, {}
        for mode, m in built.items():
            call = partial(_with_backend, mode, partial(m, x))
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
    """Training rows, one per mode with and without gradient checkpointing: AdamW steps on the
    dual-head loss, with step time, throughput, peak memory and speed-up over ``eager``.

    Args:
        model: the Conformer; each mode trains its own copy.
        modes: modes to run, from :data:`MODES`; must include ``'eager'``.
        batch: images per step.
        image_size: height and width of the random input, in pixels.
        rounds: timed steps per mode, the modes interleaved.
        warmup: untimed steps per mode first.
        compile: run the modes other than ``eager`` through ``torch.compile``.
        device: where to run.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    target = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)
    rows = []
    for grad_checkpointing in (False, True):
        model.train().set_grad_checkpointing(grad_checkpointing)
        model.set_dual_head_training(True)
        built = _build_modes(model, modes, compile, device, training=True)
        print(f'training batch {batch}, grad_checkpointing={grad_checkpointing}', file=sys.stderr)
        steps, first_loss, warm_s = {}, {}, {}
        for mode, m in built.items():
            autocast = torch.bfloat16 if mode == 'bf16' else None
            inputs = x if mode == 'eager' else x.contiguous(memory_format=torch.channels_last)
            step = _train_step_fn(m, inputs, target, autocast)
            steps[mode] = partial(_with_backend, mode, step)
            start = time.perf_counter()
            first_loss[mode] = steps[mode]()  # same weights and batch in every mode
            for _ in range(warmup - 1):
                steps[mode]()
            warm_s[mode] = time.perf_counter() - start
        times = _interleaved_times(steps, rounds, device)
        for mode in modes:
            row = dict(mode=mode, batch=batch, grad_checkpointing=grad_checkpointing)
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
    """Run the whole benchmark for each of ``variants``; returns the JSON-ready result.

    Args:
        variants: registered model names to benchmark.
        batch_sizes: inference batch sizes.
        train_batch: training batch size.
        image_size: input height and width in pixels; None means each variant's default input
            size.
        rounds: timed calls per mode (at least 1).
        warmup: untimed calls per mode first (at least 1).
        compile: use ``torch.compile`` (inference: the fp32 and bf16 modes; training: every
            mode but ``eager``).
        modes: modes to run, from :data:`MODES`; must include ``'eager'``.
        gemm_size: size of the square GEMM timed as the matmul peak.
        skip_training: measure inference only.
        model_kwargs: passed to ``timm.create_model`` for every variant.
        keep_freed_memory: on the CPU, call :func:`conformer.runtime.keep_freed_memory` first.

    Raises:
        ValueError: no variants, an unknown variant, no ``'eager'`` mode, or rounds or warmup
            below 1.
    """
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
        machine=dict(platform=platform.platform(), cpu=runtime.cpu_description(),
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
