"""The one place that picks which implementation of an op runs: PyTorch, Triton or oneDNN.

Every public op in ``conformer.kernels`` asks :func:`dispatch`; no other module in the project
branches on the device or the backend. An op's ``backend=`` argument wins over the innermost
``with use_backend(...)`` block (per thread / asyncio task), which wins over the process-wide
:func:`set_backend` default. Backends:

- ``'auto'`` (default): Triton when every tensor is on CUDA and the op supports the shape and
  dtype, PyTorch otherwise.
- ``'triton'``: always Triton. CPU tensors work only under ``TRITON_INTERPRET=1`` (slow; for
  tests); an unsupported shape raises an error naming the limit instead of falling back.
- ``'onednn'``: for CPU inference, oneDNN on weights packed once (:mod:`.onednn`) for the ops
  that have it and the inputs it takes, outside CPU autocast; everything else as under
  ``'auto'``. Packed weights are a cache that pays off only while the weights stay fixed,
  hence not the default (:func:`conformer.deploy.optimize_for_inference` picks it).
- ``'torch'``: always the PyTorch reference.

Implementations without a backward (all but Triton attention) and attention dropout leave
the call to PyTorch whenever autograd or dropout needs it, whatever the backend, so training
never breaks.
"""
import contextlib
import contextvars
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch wheels ship without Triton; the torch path must still work
    triton = None
    tl = SimpleNamespace(constexpr=None)  # kernel signatures are annotated with tl.constexpr

__all__ = ['BACKENDS', 'dispatch', 'get_backend', 'set_backend', 'use_backend']

BACKENDS = ('auto', 'triton', 'torch', 'onednn')


def _interpreting():
    """Whether @triton.jit builds interpreted functions. Triton reads TRITON_INTERPRET when a
    kernel is decorated, so reading it when this module is imported tells what the kernels are."""
    if triton is None:
        return False
    if hasattr(triton, 'knobs'):
        return bool(triton.knobs.runtime.interpret)
    # Triton before knobs
    return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'yes', 'on', 'y')


INTERPRET = _interpreting()

_default = 'auto'  # process-wide, from set_backend
_scoped = contextvars.ContextVar('conformer_kernels_backend', default=None)  # from use_backend


def _checked(name):
    if name not in BACKENDS:
        raise ValueError(f'unknown kernel backend {name!r}; '
                         f'choose one of {", ".join(map(repr, BACKENDS))}')
    return name


def set_backend(name):
    """Set the process-wide default backend (one of :data:`BACKENDS`). A ``use_backend`` block
    or a ``backend=`` argument still wins over it.

    Args:
        name: 'auto', 'triton', 'torch' or 'onednn'.
    """
    global _default
    _default = _checked(name)


def get_backend():
    """The backend ops use when called without ``backend=``: the innermost :func:`use_backend`
    of this thread or task, else the process-wide default."""
    return _scoped.get() or _default


@contextlib.contextmanager
def use_backend(name):
    """Use backend ``name`` inside the ``with`` block, in this thread or asyncio task only; the
    previous choice comes back on exit, also on an exception. A ``backend=`` argument passed to
    an op still wins over it.

    Args:
        name: 'auto', 'triton', 'torch' or 'onednn'.
    """
    token = _scoped.set(_checked(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def needs_grad(*tensors):
    """True if autograd will need the backward of an op taking ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dispatch(op, backend, tensors, triton_limit=None, onednn_limit=None, differentiable=(),
             reference_only=False):
    """Which implementation of ``op`` runs this call: ``'torch'``, ``'triton'`` or ``'onednn'``.

    Args:
        op: the op's name, for error messages.
        backend: the call's ``backend=`` argument (None: :func:`get_backend`).
        tensors: the op's tensor arguments (None for an absent optional one).
        triton_limit: if the op has a Triton kernel, a callable returning None when the kernel takes
            this input, else a sentence naming the limit it breaks (called only when needed).
        onednn_limit: the same for the op's oneDNN implementation (:mod:`.onednn`).
        differentiable: the implementations that have a backward; the others are passed over
            when autograd needs one.
        reference_only: the call needs something only the PyTorch reference does (dropout).
    """
    name = get_backend() if backend is None else _checked(backend)
    tensors = [t for t in tensors if t is not None]
    if name == 'torch' or reference_only:
        return 'torch'
    grad = needs_grad(*tensors)
    if name == 'onednn':
        # under CPU autocast the reference computes in autocast's dtype; oneDNN would not
        if onednn_limit is not None and not grad and not torch.is_autocast_enabled('cpu') and \
                all(t.device.type == 'cpu' for t in tensors) and onednn_limit() is None:
            return 'onednn'
        name = 'auto'
    if triton_limit is None or (grad and 'triton' not in differentiable):
        return 'torch'
    on_cuda = all(t.is_cuda for t in tensors)
    if name == 'auto':
        return 'triton' if triton is not None and on_cuda and triton_limit() is None else 'torch'
    if triton is None:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not "
                           'installed; install it (it ships with CUDA builds of PyTorch) or use '
                           "backend='auto'")
    if not on_cuda and not INTERPRET:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f'{op}: backend=\'triton\' got tensors on {", ".join(devices)}; move '
                           'them to a CUDA device, or set TRITON_INTERPRET=1 in the environment '
                           'before importing conformer to run the kernels on CPU (slow, for '
                           "tests), or use backend='auto'")
    reason = triton_limit()
    if reason is not None:
        raise ValueError(f"{op}: backend='triton' cannot run this input: {reason}; "
                         "use backend='auto' to fall back to PyTorch for it")
    return 'triton'


def tensor_limit(*tensors):
    """None if the kernels can take these tensors (one float dtype, non-empty, 32-bit
    indexable), else the reason."""
    tensors = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in tensors}
    if not tensors:
        return None
    if len(dtypes) != 1 or not dtypes <= {torch.float16, torch.bfloat16, torch.float32}:
        names = ', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))
        return f'tensors must share one dtype among float16, bfloat16, float32 (got {names})'
    if any(t.numel() == 0 for t in tensors):
        return 'tensors must not be empty'
    if any(t.numel() >= 2**31 for t in tensors):
        return 'tensors must have fewer than 2**31 elements (the kernels index in 32 bits)'
    return None


def compute_dtype(x):
    """The dtype an op on activation ``x`` computes in: autocast's for x's device when autocast
    is on (as F.conv2d and F.linear would), else x's. Weights and affine parameters are cast to
    it, so fp32 parameters under fp16/bf16 autocast still reach the kernels."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dot_precision(dtype, allow_tf32):
    """``input_precision`` for ``tl.dot``: fp32 inputs use TF32 only where PyTorch would
    (``allow_tf32`` is the matching torch.backends flag); 16-bit inputs ignore it."""
    return 'ieee' if dtype == torch.float32 and not allow_tf32 else 'tf32'


def next_pow2(n, minimum=16):
    """Block size covering ``n``: tl.arange needs powers of two, tl.dot at least 16."""
    return max(minimum, 1 << (n - 1).bit_length())


jit = triton.jit if triton is not None else (lambda fn: fn)


class Launch(NamedTuple):
    """One kernel launch: an autotuned kernel, its grid (a function of the chosen config), its
    positional arguments and constexpr keywords. Launchers build these and run them, so that
    ``conformer.kernels.compile_check`` compiles exactly what they launch."""

    kernel: object
    grid: object
    args: tuple
    constexprs: dict

    def run(self):
        self.kernel[self.grid](*self.args, **self.constexprs)


def fitting_configs(configs, shared_bytes, limit):
    """The configs whose shared memory, ``shared_bytes(config)`` bytes, fits in ``limit``; the
    first config if none does, so that its launch names the shortfall."""
    return [c for c in configs if shared_bytes(c) <= limit] or configs[:1]


def kernel(key, configs, interpret, ieee_configs=None):
    """``@triton.jit`` plus autotuning on a GPU.

    Args:
        key: argument names whose values pick a tuned config (with the tensors' dtypes).
        configs: dicts of meta-parameters with optional ``num_warps`` / ``num_stages``, for
            16-bit inputs and for fp32 with TF32 dots.
        interpret: the single config used under TRITON_INTERPRET (large tiles, so few programs
            run, and no GPU timer is needed to pick it).
        ieee_configs: the configs for fp32 with IEEE dots (a kernel's ``PRECISION='ieee'``),
            which run as FMA loops holding whole tiles in registers, so large tiles spill;
            default ``configs``.

    Before timing, the autotuner keeps the configs of the call's precision whose compiled
    shared memory fits the device. The returned kernel's ``configs_by_precision`` maps 'tf32'
    and 'ieee' to their ``triton.Config`` lists (what ahead-of-time compile checks walk).
    """

    def to_config(c):
        meta = {k: v for k, v in c.items() if k not in ('num_warps', 'num_stages')}
        return triton.Config(meta, num_warps=c.get('num_warps', 4),
                             num_stages=c.get('num_stages', 2))

    def decorate(fn):
        if triton is None:
            return fn
        jitted = triton.jit(fn)
        made = {}  # one Config object per distinct dict, shared by both precisions
        by_precision = {
            precision: [made.setdefault(repr(sorted(c.items())), to_config(c)) for c in chosen]
            for precision, chosen in (('tf32', configs), ('ieee', ieee_configs or configs))}

        def prune(candidates, named_args, **kwargs):
            own = by_precision[kwargs.get('PRECISION', 'tf32')]
            device = torch.cuda.current_device()
            limit = triton.runtime.driver.active.utils.get_device_properties(device)[
                'max_shared_mem']

            def shared_bytes(config):
                compiled = jitted.warmup(*named_args.values(), grid=(1,), **kwargs,
                                         **config.all_kwargs())
                return compiled.metadata.shared

            return fitting_configs([c for c in candidates if c in own], shared_bytes, limit)

        if INTERPRET:
            tuned = triton.autotune([to_config(interpret)], key=key)(jitted)
        else:
            tuned = triton.autotune(list(made.values()), key=key,
                                    prune_configs_by=dict(early_config_prune=prune))(jitted)
        tuned.configs_by_precision = by_precision
        return tuned

    return decorate
