"""The backend switch of conformer.kernels: names, scoping, precedence, fallbacks, errors."""

import importlib.util
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conformer.kernels as K
from conformer.kernels import backend as B
from conformer.kernels import conv as conv_module


def _qkv():
    return [torch.randn(1, 2, 20, 64, requires_grad=True) for _ in range(3)]


def _ran_triton(out):
    return type(out.grad_fn).__name__ == "FlashAttentionBackward"


@pytest.fixture(autouse=True)
def _restore_default():
    previous = K.get_backend()
    yield
    K.set_backend(previous)


def test_default_is_auto_and_auto_on_cpu_uses_pytorch():
    assert K.get_backend() == "auto"
    assert not _ran_triton(K.attention(*_qkv()))


def test_bad_backend_names_list_the_choices():
    for call in (lambda: K.set_backend("cuda"), lambda: K.use_backend("fast").__enter__(),
                 lambda: K.attention(*_qkv(), backend="Triton")):
        with pytest.raises(ValueError, match="choose one of 'auto', 'triton', 'torch'"):
            call()


def test_set_backend_sets_the_process_default():
    K.set_backend("triton")
    assert _ran_triton(K.attention(*_qkv()))
    K.set_backend("torch")
    assert not _ran_triton(K.attention(*_qkv()))


def test_use_backend_restores_previous_even_on_exception():
    K.set_backend("torch")
    with pytest.raises(RuntimeError, match="boom"):
        with K.use_backend("triton"):
            assert K.get_backend() == "triton"
            with K.use_backend("auto"):
                raise RuntimeError("boom")
    assert K.get_backend() == "torch"


def test_use_backend_is_local_to_the_thread():
    seen = []
    with K.use_backend("torch"):
        worker = threading.Thread(target=lambda: seen.append(K.get_backend()))
        worker.start()
        worker.join()
    assert seen == ["auto"]


def test_per_call_argument_wins_over_default_and_context():
    with K.use_backend("torch"):
        assert _ran_triton(K.attention(*_qkv(), backend="triton"))
    with K.use_backend("triton"):
        assert not _ran_triton(K.attention(*_qkv(), backend="torch"))


def test_auto_picks_triton_only_on_cuda_with_a_supported_shape():
    """The device rule itself, with stand-ins for CUDA tensors (there is no GPU here)."""
    cuda = SimpleNamespace(is_cuda=True, device="cuda:0")
    cpu = SimpleNamespace(is_cuda=False, device="cpu")
    assert B.use_triton("op", "auto", [cuda], lambda: None)
    assert not B.use_triton("op", "auto", [cuda, cpu], lambda: None)
    assert not B.use_triton("op", "auto", [cuda], lambda: "too big")
    assert not B.use_triton("op", "auto", [cuda], lambda: None, torch_only=True)
    assert not B.use_triton("op", "triton", [cuda], lambda: None, torch_only=True)


def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(B, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA device, or set TRITON_INTERPRET=1"):
        K.attention(*_qkv(), backend="triton")


def test_triton_with_unsupported_shape_names_the_limit():
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="1x1 or 3x3 \\(got 5x5\\)"):
        K.conv_bn_act(x, torch.randn(8, 8, 5, 5), torch.ones(8), torch.zeros(8), backend="triton")
    q = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match="head dim D must be at most 128"):
        K.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match="one dtype among float16, bfloat16, float32 \\(got float32, float64\\)"):
        K.attention(q, q.double(), q, backend="triton")
    # 'auto' takes the PyTorch path for the same inputs
    K.conv_bn_act(x, torch.randn(8, 8, 5, 5), torch.ones(8), torch.zeros(8))


def test_inference_only_kernels_run_triton_without_grad(monkeypatch):
    calls = []
    real = conv_module._conv_bn_act_triton
    monkeypatch.setattr(conv_module, "_conv_bn_act_triton", lambda *a: calls.append(1) or real(*a))
    x, weight = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 1, 1, requires_grad=True)
    args = (x, weight, torch.ones(16), torch.zeros(16))
    K.conv_bn_act(*args, backend="triton")  # grad needed: PyTorch
    assert calls == []
    with torch.no_grad():
        K.conv_bn_act(*args, backend="triton")
    assert calls == [1]


def test_import_and_pytorch_path_work_without_triton(monkeypatch):
    """CPU-only PyTorch wheels ship without Triton: the package must import and run anyway.
    Loads a fresh copy of the package under another name while ``import triton`` fails."""
    monkeypatch.setitem(sys.modules, "triton", None)
    folder = Path(K.__file__).parent
    spec = importlib.util.spec_from_file_location("kernels_without_triton", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    try:
        spec.loader.exec_module(fresh)
        q = torch.randn(1, 1, 4, 8)
        assert fresh.attention(q, q, q).shape == q.shape
        with pytest.raises(RuntimeError, match="triton package, which is not installed"):
            fresh.attention(q, q, q, backend="triton")
    finally:
        for name in [n for n in sys.modules if n.startswith(spec.name + ".")]:
            del sys.modules[name]
