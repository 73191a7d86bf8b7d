"""The backend switch of conformer.kernels (names, scoping, precedence, fallbacks, errors) and
the oneDNN implementations it picks under 'onednn'."""

import importlib.util
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import conformer.kernels as K
from conformer.kernels import backend as B
from conformer.kernels import conv as conv_module
from conformer.kernels import onednn
from conformer.kernels.conv import conv_bn_act_reference
from conformer.kernels.linear import linear_reference

NATIVE_BF16 = onednn.takes_dtype(torch.bfloat16)


def _qkv():
    return [torch.randn(1, 2, 20, 64, requires_grad=True) for _ in range(3)]


def _ran_triton(out):
    return type(out.grad_fn).__name__ == 'FlashAttentionBackward'


@pytest.fixture(autouse=True)
def _restore_default():
    previous = K.get_backend()
    yield
    K.set_backend(previous)


def test_default_is_auto_and_auto_on_cpu_uses_pytorch():
    assert K.get_backend() == 'auto'
    assert not _ran_triton(K.attention(*_qkv()))


def test_bad_backend_names_list_the_choices():
    for call in (lambda: K.set_backend('cuda'), lambda: K.use_backend('fast').__enter__(),
                 lambda: K.attention(*_qkv(), backend='Triton')):
        with pytest.raises(ValueError, match="choose one of 'auto', 'triton', 'torch', 'onednn'"):
            call()


def test_set_backend_sets_the_process_default():
    K.set_backend('triton')
    assert _ran_triton(K.attention(*_qkv()))
    K.set_backend('torch')
    assert not _ran_triton(K.attention(*_qkv()))


def test_use_backend_restores_previous_even_on_exception():
    K.set_backend('torch')
    with pytest.raises(RuntimeError, match='boom'):
        with K.use_backend('triton'):
            assert K.get_backend() == 'triton'
            with K.use_backend('auto'):
                raise RuntimeError('boom')
    assert K.get_backend() == 'torch'


def test_use_backend_is_local_to_the_thread():
    seen = []
    with K.use_backend('torch'):
        worker = threading.Thread(target=lambda: seen.append(K.get_backend()))
        worker.start()
        worker.join()
    assert seen == ['auto']


def test_per_call_argument_wins_over_default_and_context():
    with K.use_backend('torch'):
        assert _ran_triton(K.attention(*_qkv(), backend='triton'))
    with K.use_backend('triton'):
        assert not _ran_triton(K.attention(*_qkv(), backend='torch'))


def _stand_in(device, requires_grad=False):
    """A tensor stand-in on ``device`` (so the CUDA routes are tested without a GPU)."""
    return SimpleNamespace(is_cuda=device == 'cuda', device=torch.device(device),
                           requires_grad=requires_grad)


def test_auto_picks_triton_only_on_cuda_with_a_supported_shape():
    """The device rule itself, with stand-ins for CUDA tensors."""
    cuda, cpu, fits = _stand_in('cuda'), _stand_in('cpu'), (lambda: None)
    assert B.dispatch('op', 'auto', [cuda], triton_limit=fits) == 'triton'
    assert B.dispatch('op', 'auto', [cuda, cpu], triton_limit=fits) == 'torch'
    assert B.dispatch('op', 'auto', [cuda], triton_limit=lambda: 'too big') == 'torch'
    assert B.dispatch('op', 'auto', [cuda]) == 'torch'  # the op has no Triton kernel
    for backend in ('auto', 'triton', 'onednn'):
        assert B.dispatch('op', backend, [cuda], triton_limit=fits, reference_only=True) == 'torch'


def test_autograd_skips_implementations_without_a_backward():
    grad, fits = _stand_in('cuda', requires_grad=True), (lambda: None)
    for backend in ('auto', 'triton'):
        assert B.dispatch('op', backend, [grad], triton_limit=fits) == 'torch'
        assert B.dispatch('op', backend, [grad], triton_limit=fits,
                          differentiable=('triton',)) == 'triton'
    with torch.no_grad():
        assert B.dispatch('op', 'triton', [grad], triton_limit=fits) == 'triton'
    cpu_grad = _stand_in('cpu', requires_grad=True)
    assert B.dispatch('op', 'onednn', [cpu_grad], onednn_limit=fits) == 'torch'


def test_onednn_takes_cpu_ops_it_has_and_leaves_the_rest_to_auto():
    cpu, cuda, fits = _stand_in('cpu'), _stand_in('cuda'), (lambda: None)
    assert B.dispatch('op', 'onednn', [cpu], onednn_limit=fits) == 'onednn'
    assert B.dispatch('op', 'auto', [cpu], onednn_limit=fits) == 'torch'  # only when asked
    assert B.dispatch('op', 'onednn', [cpu], onednn_limit=lambda: 'no bf16 here') == 'torch'
    assert B.dispatch('op', 'onednn', [cpu], triton_limit=fits) == 'torch'  # no oneDNN version
    assert B.dispatch('op', 'onednn', [cuda], onednn_limit=fits, triton_limit=fits) == 'triton'


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(B, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='CUDA device, or set TRITON_INTERPRET=1'):
        K.attention(*_qkv(), backend='triton')


def test_triton_with_unsupported_shape_names_the_limit():
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match='1x1 or 3x3 \\(got 5x5\\)'):
        K.conv_bn_act(x, torch.randn(8, 8, 5, 5), torch.ones(8), torch.zeros(8), backend='triton')
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match='head dim D must be at most 128'):
        K.attention(q, q, q, backend='triton')
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match='one dtype among float16, bfloat16, float32 '
                                         '\\(got float32, float64\\)'):
        K.attention(q, q.double(), q, backend='triton')
    # 'auto' takes the PyTorch path for the same inputs
    K.conv_bn_act(x, torch.randn(8, 8, 5, 5), torch.ones(8), torch.zeros(8))


def test_inference_only_kernels_run_triton_without_grad(monkeypatch):
    calls = []
    real = conv_module._conv_bn_act_triton
    monkeypatch.setattr(conv_module, '_conv_bn_act_triton', lambda *a: calls.append(1) or real(*a))
    x, weight = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 1, 1, requires_grad=True)
    args = (x, weight, torch.ones(16), torch.zeros(16))
    K.conv_bn_act(*args, backend='triton')  # grad needed: PyTorch
    assert calls == []
    with torch.no_grad():
        K.conv_bn_act(*args, backend='triton')
    assert calls == [1]


def test_import_and_pytorch_path_work_without_triton(monkeypatch):
    """CPU-only PyTorch wheels ship without Triton: the package must import and run anyway.
    Loads a fresh copy of the package under another name while ``import triton`` fails."""
    monkeypatch.setitem(sys.modules, 'triton', None)
    folder = Path(K.__file__).parent
    spec = importlib.util.spec_from_file_location('kernels_without_triton', folder / '__init__.py',
                                                  submodule_search_locations=[str(folder)])
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    try:
        spec.loader.exec_module(fresh)
        q = torch.randn(1, 1, 4, 8)
        assert fresh.attention(q, q, q).shape == q.shape
        with pytest.raises(RuntimeError, match='triton package, which is not installed'):
            fresh.attention(q, q, q, backend='triton')
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name + '.')]:
            del sys.modules[name]


def _conv_args(dtype, c_in=8, c_out=16, k=3, hw=(9, 11), batch=2):
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, *hw).to(dtype)
    weight = (torch.randn(c_out, c_in, k, k) / (c_in * k * k) ** 0.5).to(dtype)
    return x, weight, (torch.rand(c_out) + 0.5).to(dtype), (torch.randn(c_out) * 0.1).to(dtype)


ONEDNN_DTYPES = [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    not NATIVE_BF16, reason='oneDNN takes bf16 only on CPUs with native bf16'))]


@pytest.mark.parametrize('dtype, tolerance', ONEDNN_DTYPES, ids=['fp32', 'bf16'])
@pytest.mark.parametrize('k, stride', [(3, 2), (3, 1), (1, 1)], ids=['strided', '3x3', 'pointwise'])
def test_onednn_conv_bn_act_matches_the_reference_as_shape_layout_and_weights_change(
        k, stride, dtype, tolerance, monkeypatch):
    calls = []
    real = onednn.conv_bn_act
    monkeypatch.setattr(onednn, 'conv_bn_act', lambda *a: calls.append(1) or real(*a))
    x, weight, scale, shift = _conv_args(dtype, k=k)

    def check(x, residual=None, relu=True):
        with torch.no_grad():
            got = K.conv_bn_act(x, weight, scale, shift, stride, residual, relu, backend='onednn')
        want = conv_bn_act_reference(x.double(), weight.double(), scale.double(), shift.double(),
                                     stride, None if residual is None else residual.double(), relu)
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
        return got

    # each new input shape repacks the weight; going back to an old one must repack again
    for shape in [(2, 8, 9, 11), (1, 8, 16, 16), (2, 8, 9, 11)]:
        for channels_last in (True, False):
            x = torch.randn(shape).to(dtype)
            check(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    out = check(x, relu=False)
    check(x, residual=torch.randn_like(out, memory_format=torch.contiguous_format))
    # the packed weight follows an in-place write (load_state_dict) and a new scale
    with torch.no_grad():
        weight.mul_(-1)
    check(x)
    scale = scale * 2
    check(x)
    assert len(calls) == 10


@pytest.mark.parametrize('dtype, tolerance', ONEDNN_DTYPES, ids=['fp32', 'bf16'])
@pytest.mark.parametrize('gelu', [False, True])
def test_onednn_linear_matches_the_reference_and_follows_its_weight(gelu, dtype, tolerance,
                                                                   monkeypatch):
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, 'linear', lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16).to(dtype)
    weight, bias = (torch.randn(40, 16) / 4).to(dtype), torch.randn(40).to(dtype)
    for _ in range(2):
        with torch.no_grad():
            got = K.linear(x, weight, bias, gelu=gelu, backend='onednn')
        want = linear_reference(x.double(), weight.double(), bias.double(), gelu)
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
        with torch.no_grad():
            weight.copy_(torch.randn_like(weight))
    assert len(calls) == 2


def test_onednn_leaves_what_it_cannot_run_to_pytorch(monkeypatch):
    monkeypatch.setattr(onednn, 'conv_bn_act', None)  # calling it would raise
    monkeypatch.setattr(onednn, 'linear', None)
    x, weight, scale, shift = _conv_args(torch.float32)
    weight.requires_grad_(True)
    want = conv_bn_act_reference(x, weight, scale, shift)
    torch.testing.assert_close(K.conv_bn_act(x, weight, scale, shift, backend='onednn'), want)
    with torch.no_grad():
        even = torch.randn(16, 8, 2, 2)  # no k // 2 padding for an even kernel
        assert 'odd size' in onednn.conv_limit(x, even)
        assert 'one dtype' in onednn.conv_limit(x, weight.double())
        monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
        assert 'does not take torch.bfloat16' in onednn.linear_limit(x.bfloat16(),
                                                                     weight.bfloat16())
        linear_x, linear_w = torch.randn(3, 8).bfloat16(), torch.randn(4, 8).bfloat16()
        torch.testing.assert_close(K.linear(linear_x, linear_w, backend='onednn'),
                                   F.linear(linear_x, linear_w))


def _autocast_cases():
    """Each op on fp32 inputs, as (its call with a backend, its reference's call)."""
    from conformer.kernels.fcu import fcu_down_reference, fcu_up_reference
    from conformer.kernels.flash_attention import attention_reference

    torch.manual_seed(0)
    x, weight, scale, shift = _conv_args(torch.float32)
    residual = torch.randn(2, 16, 9, 11)
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    tokens, maps = torch.randn(2, 6, 32), torch.randn(2, 8, 6, 9)
    down = (maps, torch.randn(32, 8, 1, 1) / 8**0.5, torch.randn(32), (2, 3),
            torch.rand(32) + 0.5, torch.randn(32), 1e-6)
    up = (tokens, (2, 3), torch.randn(8, 32, 1, 1) / 32**0.5, torch.randn(8), torch.rand(8) + 0.5,
          torch.randn(8), (6, 9), maps)
    linear_args = (torch.randn(5, 32), torch.randn(24, 32) / 32**0.5, torch.randn(24))
    conv = (x, weight, scale, shift)
    return {
        'conv_bn_act': (lambda b: K.conv_bn_act(*conv, backend=b), lambda: conv_bn_act_reference(
            *conv)),
        'conv_bn_act+residual': (lambda b: K.conv_bn_act(*conv, residual=residual, backend=b),
                                 lambda: conv_bn_act_reference(*conv, residual=residual)),
        'linear': (lambda b: K.linear(*linear_args, gelu=True, backend=b),
                   lambda: linear_reference(*linear_args, gelu=True)),
        'attention': (lambda b: K.attention(q, k, v, backend=b), lambda: attention_reference(
            q, k, v)),
        'fcu_down': (lambda b: K.fcu_down(*down, backend=b), lambda: fcu_down_reference(*down)),
        'fcu_up': (lambda b: K.fcu_up(*up, backend=b), lambda: fcu_up_reference(*up)),
    }


@pytest.mark.parametrize('backend', ['triton', 'onednn'])
@pytest.mark.parametrize('op', list(_autocast_cases()))
def test_every_path_returns_what_its_reference_returns_under_autocast(op, backend):
    """Under autocast an op computes in autocast's dtype and returns its reference's dtype (fp32
    where the reference's residual add or LayerNorm promotes), whichever backend runs it; fp16
    autocast, as the interpreter's bf16 math is wrong."""
    call, reference = _autocast_cases()[op]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        got, want = call(backend), reference()
    assert want.dtype == (torch.float32 if op in ('conv_bn_act+residual', 'fcu_up')
                          else torch.float16)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
