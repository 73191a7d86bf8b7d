"""Compile every Triton kernel ahead of time for NVIDIA GPUs, on a machine without one.

A kernel that runs in the Triton interpreter can still fail to compile for a GPU (loop-carried
values that change type, dot shapes the hardware lacks, shared memory over the limit), and
its autotuner would only find out on the first launch. This module builds each launch the
way the ops do, on meta tensors at Conformer's shapes, and runs it through
``triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`` with the ptxas that
ships in the triton wheel, for every config the kernel's autotuner can choose. The argument
types, constexprs and alignment/``== 1`` specialisations come from Triton's own binder, so
what compiles here is what a launch compiles.

Used by tests/test_kernels/test_compile.py (CI) and ``tools/bench_kernels.py --compile-only`` (the
full matrix, with registers and spills).
"""

import contextlib
import io
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch

from . import conv, fcu, flash_attention
from .backend import dot_precision, fitting_configs, triton

# Shared memory one block may use (opt-in maximum), in bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}
EMBED_DIM = 384  # Conformer-Ti/S (base: 576, see FCU_EMBED_DIMS)
FCU_EMBED_DIMS = (384, 576)
TOKENS = 197  # 14 x 14 patches + the class token at 224 px


def _meta(*shape, dtype):
    return torch.empty(*shape, device='meta', dtype=dtype)


def attention_launches(dtype, precision, head_dim):
    """Forward and backward launches of attention on packed qkv (the ViT layout)."""
    B, H, N, D = 2, EMBED_DIM // head_dim, TOKENS, head_dim
    q, k, v = _meta(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    o, lse = flash_attention._forward_outputs(q)
    do, delta = torch.empty_like(o), torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    scale = D**-0.5
    names = ('attention_bwd_delta', 'attention_bwd_dkdv', 'attention_bwd_dq')
    backward = flash_attention.backward_launches(q, k, v, o, lse, do, delta, dq, dk, dv, scale,
                                                 precision)
    forward = flash_attention.forward_launch(q, k, v, o, lse, scale, precision)
    return {f'attention_fwd D{D}': forward,
            **{f'{name} D{D}': launch for name, launch in zip(names, backward)}}


# Conformer-S ConvBlock convs, one per constexpr variant: (name, C_in, C_out, map, k, stride,
# residual, relu).
CONV_CASES = [
    ('1x1 reduce', 256, 64, 56, 1, 1, False, True),
    ('3x3', 64, 64, 56, 3, 1, False, True),
    ('3x3 stride 2', 128, 128, 56, 3, 2, False, True),
    ('1x1 expand + residual', 64, 256, 56, 1, 1, True, True),
    ('1x1 residual conv', 64, 256, 56, 1, 1, False, False),
    ('1x1 residual conv stride 2', 256, 512, 56, 1, 2, False, False),
]


def conv_launches(dtype, precision):
    launches = {}
    for name, C_in, C_out, size, k, stride, residual, relu in CONV_CASES:
        x = _meta(2, C_in, size, size, dtype=dtype).to(memory_format=torch.channels_last)
        weight = _meta(C_out, C_in, k, k, dtype=dtype).to(memory_format=torch.channels_last)
        scale, shift = _meta(C_out, dtype=torch.float32), _meta(C_out, dtype=torch.float32)
        out = conv._output(x, weight, stride)
        res = torch.empty_like(out) if residual else None
        launches[f'conv_bn_act {name}'] = conv.conv_launch(x, weight, scale, shift, out, stride,
                                                           res, relu, precision)
    return launches


def fcu_launches(dtype, precision):
    """FCU-down and FCU-up of Conformer's first stage (56 x 56 map, 14 x 14 tokens)."""
    launches = {}
    for C_tok in FCU_EMBED_DIMS:
        x = _meta(2, 64, 56, 56, dtype=dtype).to(memory_format=torch.channels_last)
        tokens = _meta(2, 196, C_tok, dtype=dtype)
        down = (x, _meta(C_tok, 64, 1, 1, dtype=dtype), _meta(C_tok, dtype=dtype), (14, 14),
                _meta(C_tok, dtype=dtype), _meta(C_tok, dtype=dtype), 1e-6)
        up = (tokens, (14, 14), _meta(64, C_tok, 1, 1, dtype=dtype), _meta(64, dtype=dtype),
              _meta(64, dtype=torch.float32), _meta(64, dtype=torch.float32), (56, 56), x)
        out = fcu._fcu_down_output(x, down[1], (14, 14))
        launches[f'fcu_down C{C_tok}'] = fcu.fcu_down_launch(*down, out, precision)
        if dtype != torch.float32:  # under CUDA autocast it writes fp32 tokens
            launches[f'fcu_down C{C_tok} fp32 out'] = fcu.fcu_down_launch(
                *down, out.float(), precision)
        launches[f'fcu_up C{C_tok}'] = fcu.fcu_up_launch(*up, torch.empty_like(x), precision)
    return launches


@dataclass(frozen=True)
class Job:
    """One kernel launch compiled with one of its configs for one GPU architecture."""

    family: str  # 'attention' | 'conv' | 'fcu'
    case: str
    arch: int
    dtype: str
    precision: str  # the kernels' PRECISION: 'tf32' (also for 16-bit inputs) or 'ieee'
    head_dim: int
    config: int  # index into the kernel's configs_by_precision[precision]


def launches(family, dtype, precision, head_dim):
    dtype = DTYPES[dtype]
    if family == 'attention':
        return attention_launches(dtype, precision, head_dim)
    return conv_launches(dtype, precision) if family == 'conv' else fcu_launches(dtype, precision)


def precisions(dtype):
    """The dot precisions a dtype can run with: fp32 has both, TF32 and IEEE."""
    return ('tf32', 'ieee') if dtype == 'float32' else (dot_precision(DTYPES[dtype], True),)


def jobs(archs=(80, 90), dtypes=('float16', 'bfloat16'), head_dims=(64,)):
    """Every (launch, config) pair for these architectures, dtypes and attention head dims."""
    found = []
    for arch in archs:
        for dtype in dtypes:
            for precision in precisions(dtype):
                work = [('attention', d) for d in head_dims] + [('conv', 0), ('fcu', 0)]
                for family, head_dim in work:  # head_dim matters to attention only
                    for case, launch in launches(family, dtype, precision, head_dim).items():
                        n = len(launch.kernel.configs_by_precision[precision])
                        found += [Job(family, case, arch, dtype, precision, head_dim, i)
                                  for i in range(n)]
    return found


def compile_launch(launch, config, arch):
    """Compile ``launch`` with ``config`` for sm_``arch``. Returns (compiled kernel, ptxas log);
    the log is empty when Triton's cache already held the kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError('kernels imported under TRITON_INTERPRET=1 cannot be compiled (Triton '
                           'builds its own library functions for the interpreter then); compile '
                           'in a process without it, as run_jobs does')
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.constexprs, **config.all_kwargs())
    # what JITFunction.run does before it compiles (Triton 3.x internals, no public equivalent)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def config_name(config):
    meta = ' '.join(f'{k}={v}' for k, v in config.kwargs.items())
    return f'{meta} warps={config.num_warps} stages={config.num_stages}'


def _ptxas_number(pattern, log):
    found = re.search(pattern, log)
    return int(found.group(1)) if found else None


def multiplies_in_64_bits(ttir):
    """Whether Triton IR multiplies in int64: how the kernels scale a batch index by its
    stride, so that offsets past 2**31 do not wrap."""
    return re.search(r'arith\.muli [^\n]*: (i64|tensor<[0-9x]*xi64>)(\s|$)', ttir) is not None


def run_job(job, fresh=False):
    """Compile one job; a dict with the job, kernel, config, shared, regs, spills, error.
    ``fresh`` bypasses Triton's cache so that ptxas runs and reports registers and spills."""
    launch = launches(job.family, job.dtype, job.precision, job.head_dim)[job.case]
    config = launch.kernel.configs_by_precision[job.precision][job.config]
    result = dict(asdict(job), kernel=launch.kernel.fn.__name__, config_name=config_name(config),
                  shared=None, regs=None, spills=None, int64_offsets=None, error=None)
    with triton.knobs.compilation.scope():
        triton.knobs.compilation.always_compile = fresh
        try:
            compiled, log = compile_launch(launch, config, job.arch)
        except Exception as error:  # a compile error is a result to report, not a crash
            result['error'] = f'{type(error).__name__}: {error}'
            return result
    result['shared'] = compiled.metadata.shared
    result['regs'] = _ptxas_number(r'Used (\d+) registers', log)
    result['spills'] = _ptxas_number(r'(\d+) bytes spill stores', log)
    result['int64_offsets'] = multiplies_in_64_bits(compiled.asm['ttir'])
    return result


@contextlib.contextmanager
def _environment(**values):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def run_jobs(jobs, workers=2, fresh=False):
    """Compile ``jobs`` in ``workers`` new processes that do not interpret, whatever this
    process does (the tests set TRITON_INTERPRET=1, under which Triton cannot compile)."""
    with _environment(TRITON_INTERPRET='0'), \
            ProcessPoolExecutor(workers, mp_context=get_context('spawn')) as pool:
        return list(pool.map(run_job, jobs, [fresh] * len(jobs), chunksize=4))


def kept_configs(results):
    """For each (case, arch, dtype, precision): the config names the autotuner keeps (its
    shared-memory pruning, :func:`~conformer.kernels.backend.fitting_configs`, applied to the
    compiled sizes) and whether one of them fits."""
    groups = {}
    for r in results:
        groups.setdefault((r['case'], r['arch'], r['dtype'], r['precision']), []).append(r)
    kept = {}
    for (case, arch, dtype, precision), rows in groups.items():
        limit = SHARED_MEMORY_LIMIT[arch]
        shared = {r['config_name']: r['shared'] for r in rows if r['error'] is None}
        names = fitting_configs(list(shared), shared.get, limit)
        kept[case, arch, dtype, precision] = (names, any(shared[n] <= limit for n in names))
    return kept
