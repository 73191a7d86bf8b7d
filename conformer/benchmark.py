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
(:func:`conformer.runtime.native_bf16`, e.g. AMD Zen 3 or Intel Ice Lake), where PyTorch
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
import contextlib
import copy
import importlib.util
import logging
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

__all__ = ['MODES', 'FLOAT_MODES', 'PEERS', 'reference_model', 'peak_memory_bytes',
           'gemm_routes', 'gemm_call', 'matmul_peak_gflops', 'build_peer', 'unavailable',
           'bench_inference', 'bench_training', 'run']

SCHEMA = 'conformer-benchmark/3'
FLOAT_MODES = ('eager', 'fp32', 'bf16', 'triton')  # the modes that also train
PEERS = ('ort_fp32', 'ort_int8', 'ov_fp32', 'ov_bf16', 'ov_int8')
MODES = FLOAT_MODES[:3] + ('int8',) + FLOAT_MODES[3:] + PEERS
NO_CUDA = 'skipped: no CUDA device'
NO_NATIVE_BF16 = 'skipped: no native bf16 on this device'
CPU_ONLY = 'skipped: CPU deploy only'
MISSING = {'int8': ('torchao', 'int8'), 'ort': ('onnxruntime', 'peers'),
           'ov': ('openvino', 'peers'), 'nncf': ('nncf', 'peers')}
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
    with _native_stderr_silenced(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's native library logs its start, stop
    and a failed GPU probe there, lines a benchmark user need not read."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet_python_logs():
    """Python logging at ERROR and above only, for the peers' quantizers, which log notes."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as conformer-train
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
    if mode in ('bf16', 'ov_bf16') and not runtime.native_bf16(device):
        return NO_NATIVE_BF16
    if mode not in FLOAT_MODES and device.type != 'cpu':
        return CPU_ONLY
    needs = {'int8': ['int8'], 'ov_int8': ['ov', 'nncf']}.get(mode, [mode.split('_')[0]])
    for need in needs:
        if need in MISSING and importlib.util.find_spec(MISSING[need][0]) is None:
            module, extra = MISSING[need]
            return f"skipped: {module} not installed (pip install 'conformer-zoo[{extra}]')"
    return None


def _build_modes(model: nn.Module, modes: Sequence[str], compile: bool, device: torch.device,
                 training: bool, calibration: Optional[torch.Tensor] = None,
                 workdir: Optional[str] = None) -> Dict[str, Callable]:
    """Each mode's model, for the modes the device can run (see :func:`unavailable`)."""
    built = {}
    for mode in modes:
        if unavailable(mode, device) or (training and mode not in FLOAT_MODES):
            continue
        print(f'building {mode}', file=sys.stderr)
        if mode in PEERS:
            built[mode] = build_peer(mode, model, calibration, workdir)
        elif mode == 'int8':
            built[mode] = optimize_for_inference(model.to(device), dtype=torch.int8,
                                                 calibration=calibration)
        elif mode == 'eager':
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


class _Peer:
    """Another engine's model behind ``peer(x) -> logits``; OpenVINO compiles one model per
    input shape (static shapes are its fast path)."""

    def __init__(self, compile_for: Callable[[Tuple[int, ...]], Callable]):
        self.compile_for = compile_for
        self.compiled: Dict[Tuple[int, ...], Callable] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self.compiled:
            self.compiled[shape] = self.compile_for(shape)
        return torch.from_numpy(self.compiled[shape](x.contiguous().numpy()))


def build_peer(mode: str, model: nn.Module, calibration: torch.Tensor, workdir: str) -> _Peer:
    """ONNX Runtime or OpenVINO running ``model`` (exported to ONNX once), each with its best
    CPU settings and the process's thread count, without spinning idle threads.

    ``ort_fp32``: all graph optimisations. ``ort_int8``: ``quantize_static`` (QDQ, weights
    per channel, u8 activations) on ``calibration``. ``ov_fp32`` / ``ov_bf16``: the
    ``INFERENCE_PRECISION_HINT``, latency hint, one stream. ``ov_int8``: NNCF
    ``quantize(model_type=TRANSFORMER)`` on ``calibration``, the rest in bf16 where the CPU
    has it (its fastest setting), else fp32.

    Args:
        mode: one of :data:`PEERS`.
        model: the float model.
        calibration: images (N, C, H, W) for the int8 peers.
        workdir: a folder for the ONNX files.
    """
    from pathlib import Path

    from conformer.export import export_onnx
    threads = torch.get_num_threads()
    fp32_path = Path(workdir) / 'model.onnx'
    if not fp32_path.exists():
        export_onnx(reference_model(model).eval(), str(fp32_path),
                    size=tuple(calibration.shape[-2:]))
    batches = [calibration[i:i + 8].numpy() for i in range(0, len(calibration), 8)]
    if mode.startswith('ort'):
        import onnxruntime as ort
        path = fp32_path
        if mode == 'ort_int8':
            from onnxruntime import quantization as q
            path = Path(workdir) / 'model_int8.onnx'

            class Reader(q.CalibrationDataReader):
                def __init__(self):
                    self.items = iter(batches)

                def get_next(self):
                    batch = next(self.items, None)
                    return None if batch is None else {'images': batch}

            with _quiet_python_logs():  # per-tensor notes on LayerNorm weights
                q.quantize_static(str(fp32_path), str(path), Reader(),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        return _Peer(lambda shape: lambda x: session.run(None, {'images': x})[0])
    import openvino as ov
    core = ov.Core()
    ov_model = core.read_model(str(fp32_path))
    precision = 'f32' if mode == 'ov_fp32' else 'bf16'
    if mode == 'ov_int8':
        import nncf
        nncf.set_log_level(logging.ERROR)
        # its progress bars would land in the tables on stdout
        with _quiet_python_logs(), contextlib.redirect_stdout(sys.stderr):
            ov_model = nncf.quantize(ov_model, nncf.Dataset(batches),
                                     model_type=nncf.ModelType.TRANSFORMER,
                                     subset_size=len(batches))
        if not runtime.native_bf16(torch.device('cpu')):
            precision = 'f32'
    config = {'INFERENCE_PRECISION_HINT': precision, 'INFERENCE_NUM_THREADS': threads,
              'PERFORMANCE_HINT': 'LATENCY', 'NUM_STREAMS': 1}

    def compile_for(shape):
        reshaped = ov_model.clone()
        reshaped.reshape({reshaped.inputs[0].any_name: list(shape)})
        request = core.compile_model(reshaped, 'CPU', config).create_infer_request()
        return lambda x: request.infer({0: x})[0].copy()

    return _Peer(compile_for)


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


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def bench_inference(model: nn.Module, modes: Sequence[str], batch_sizes: Sequence[int],
                    image_size: int, rounds: int, warmup: int, compile: bool,
                    device: torch.device, gemm_size: int, peak_routes: Dict[str, str],
                    calibration: Optional[torch.Tensor] = None,
                    check_images: Optional[torch.Tensor] = None) -> List[dict]:
    """Inference rows, one per mode and batch size: latency, throughput, peak memory, % of
    matmul peak, speed-up over ``eager`` and top-1 agreement with it.

    Speed-up and % of peak are ratios of the medians of interleaved rounds, so they agree
    with the img/s and GFLOP/s columns.

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
        calibration: images (N, 3, H, W) that calibrate the int8 modes (ours and the peers').
        check_images: images on which top-1 agreement with ``eager`` is measured.
    """
    import tempfile
    model = model.eval()
    gemm_flops = 2 * gemm_size ** 3
    gemms = {f'gemm_{dt}': gemm_call(getattr(torch, dt), gemm_size, device, route)
             for dt, route in peak_routes.items()}
    if calibration is None:
        calibration = torch.randn(64, 3, image_size, image_size,
                                  generator=torch.Generator().manual_seed(2))
    if check_images is None:
        check_images = torch.randn(16, 3, image_size, image_size,
                                   generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as workdir:
        built = _build_modes(model, modes, compile, device, training=False,
                             calibration=calibration, workdir=workdir)
        return _inference_rows(model, built, modes, batch_sizes, image_size, rounds, warmup,
                               device, gemms, gemm_flops, check_images.to(device))


def _peak_dtype(mode: str) -> Optional[str]:
    """The GEMM dtype whose peak a mode's rate is compared with (None: int8, not measured)."""
    if mode.endswith('int8'):
        return None
    return 'bfloat16' if mode.endswith('bf16') else 'float32'


def _inference_rows(model, built, modes, batch_sizes, image_size, rounds, warmup, device,
                    gemms, gemm_flops, check_images) -> List[dict]:
    rows = []
    with torch.no_grad():
        expected_check = built['eager'](check_images)
    for batch in batch_sizes:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        # each mode's FLOPs in its own op order: the eager references' and the model's
        flops = dict(eager=count_flops(built['eager'], x), other=count_flops(model, x))
        print(f'inference batch {batch}: {flops["eager"] / 1e9:.2f} GFLOP per call in the '
              f'eager reference, {flops["other"] / 1e9:.2f} in the model', file=sys.stderr)
        with torch.no_grad():
            expected = built['eager'](x)
        calls, compile_s, agreement = {}, {}, {}
        for mode, m in built.items():
            call = partial(_with_backend, mode, partial(m, x))
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(warmup):
                    call()
                # agreement on the check images, run in batches of this size
                top1 = torch.cat([m(check_images[i:i + batch]).argmax(-1) for i in
                                  range(0, len(check_images) - batch + 1, batch)])
            agreement[mode] = (top1 == expected_check[:len(top1)].argmax(-1)).float().mean()
            compile_s[mode] = time.perf_counter() - start
            calls[mode] = call
        with torch.no_grad():
            times = _interleaved_times({**calls, **gemms}, rounds, device)
        eager_p50 = statistics.median(times['eager'])
        for mode in modes:
            row = dict(mode=mode, batch=batch)
            if mode not in calls:
                rows.append(dict(row, status=unavailable(mode, device)))
                continue
            with torch.no_grad():
                logits = calls[mode]()
                memory = None if mode in PEERS else peak_memory_bytes(calls[mode], device)
            p50 = statistics.median(times[mode])
            mode_flops = flops['eager' if mode == 'eager' else 'other']
            peak_dtype = _peak_dtype(mode)
            peak = None if f'gemm_{peak_dtype}' not in times else \
                gemm_flops / statistics.median(times[f'gemm_{peak_dtype}']) / 1e9
            rows.append(dict(
                row, status='ok',
                images_per_s=batch / p50,
                latency_ms_p50=1e3 * p50,
                latency_ms_p90=1e3 * _percentile(times[mode], 0.9),
                peak_memory_mb=None if memory is None else memory / 2 ** 20,
                gflop_per_call=mode_flops / 1e9,
                achieved_gflops=mode_flops / p50 / 1e9,
                matmul_peak_gflops=peak,
                pct_of_matmul_peak=None if peak is None else 100 * mode_flops / p50 / 1e9 / peak,
                speedup_vs_eager=eager_p50 / p50,
                max_abs_logit_diff=(logits.float() - expected).abs().max().item(),
                top1_agreement=agreement[mode].item(),
                agreement_images=len(check_images) - len(check_images) % batch,
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
                speedup_vs_eager=statistics.median(times['eager']) / p50,
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
        model_kwargs: Optional[dict] = None, keep_freed_memory: bool = False,
        calibration: Optional[str] = None) -> dict:
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
        calibration: a folder of ``<class>/<image>`` files: its first 512 images (every class)
            calibrate the int8 modes and up to 64 others measure top-1 agreement; None uses
            seeded random images for both (a random-weight model has no real images to
            agree on).

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
    if any(m.endswith('bf16') and not unavailable(m, device) for m in modes):
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
                      keep_freed_memory=keep_freed_memory, calibration=calibration),
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
                                      compile, device, gemm_size, peak_routes,
                                      *_real_images(calibration, model, size)),
            training=[] if skip_training else bench_training(
                model, modes, train_batch, size, rounds, warmup, compile, device),
        ))
    result['machine']['load_average_at_end'] = os.getloadavg()
    return result


def _real_images(folder: Optional[str], model: nn.Module,
                 size: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(calibration, check) images from ``folder``, or (None, None) for random ones."""
    if folder is None:
        return None, None
    from conformer.deploy.quantize import calibration_images
    images = torch.cat(calibration_images(folder, model, max_images=576, min_images=64).batches)
    if images.shape[-1] != size:
        raise ValueError(f"--calibration images are {images.shape[-1]} px after the model's "
                         f'eval transform, the benchmark runs at {size} px; pass --image-size '
                         f'{images.shape[-1]}')
    every_ninth = torch.arange(len(images)) % 9 == 8  # spread over the classes, like the rest
    return images[~every_ninth], images[every_ninth]


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
