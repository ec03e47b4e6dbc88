"""Backend selection from the declared capabilities: explicit requests, env override, limits, gradients."""

import pytest
import torch

from dsattn import _backend, capabilities

CPU = torch.device("cpu")
FP32 = capabilities.Request(dtype=torch.float32)


def test_auto_on_cpu_picks_cpp_when_built_else_torch():
    chosen = _backend.select_backend("int4_matmul", "auto", CPU, FP32)
    expected = "cpp" if _backend.unusable_reason("cpp", CPU) is None else "torch"
    assert chosen == expected


def test_auto_never_picks_the_interpreter():
    chosen = _backend.select_backend("sliding_window_attention", "auto", CPU, FP32)
    assert chosen == ("cpp" if _backend.unusable_reason("cpp", CPU) is None else "torch")


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select_backend("sliding_window_attention", "fast", CPU, FP32)


def test_backend_the_op_lacks_is_an_error():
    with pytest.raises(ValueError, match=r"backend='cuda' is not implemented for this op"):
        _backend.select_backend("sliding_window_attention", "cuda", CPU, FP32)


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.select_backend("int4_matmul", "cuda", CPU, FP32)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.select_backend("sliding_window_attention", "triton", CPU, FP32)


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("DSATTN_BACKEND", "torch")
    assert _backend.select_backend("int4_matmul", "auto", CPU, FP32) == "torch"
    monkeypatch.setenv("DSATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="env DSATTN_BACKEND='cuda'"):
        _backend.select_backend("int4_matmul", "auto", CPU, FP32)
    monkeypatch.setenv("DSATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DSATTN_BACKEND must be one of"):
        _backend.select_backend("int4_matmul", "auto", CPU, FP32)


def test_auto_filters_by_the_declared_capabilities(monkeypatch):
    """float64, a backward, a group size: "auto" skips the backends that cannot take them (here on CPU, the
    cpp kernel), and an explicit request for one names the limit."""
    if _backend.unusable_reason("cpp", CPU) is not None:
        pytest.skip("the CPU extension is not built")
    for request in (capabilities.Request(dtype=torch.float64), capabilities.Request(dtype=torch.float32, grad=True)):
        assert _backend.select_backend("int4_matmul", "auto", CPU, request) == "torch"
    with pytest.raises(TypeError, match="int4_matmul: backend='cpp' takes float16, bfloat16, float32 inputs, got float64"):
        _backend.select_backend("int4_matmul", "cpp", CPU, capabilities.Request(dtype=torch.float64))
    with pytest.raises(ValueError, match="int4_matmul: backend='cpp' has no backward"):
        _backend.select_backend("int4_matmul", "cpp", CPU, capabilities.Request(dtype=torch.float32, grad=True))


def test_every_op_declares_a_torch_backend_that_takes_everything():
    for op, backends in capabilities.CAPABILITIES.items():
        assert "torch" in backends, op
        if op != "int4_unpack":
            assert backends["torch"].backward and torch.float64 in backends["torch"].dtypes, op


def test_needs_grad():
    x = torch.ones(2, requires_grad=True)
    assert _backend.needs_grad(None, x)
    with torch.no_grad():
        assert not _backend.needs_grad(x)
    assert not _backend.needs_grad(x.detach())
