"""Backend selection: explicit requests, env override, and clear errors."""

import pytest
import torch

from dsattn import _backend

CPU = torch.device("cpu")


def test_auto_on_cpu_picks_cpp_when_built_else_torch():
    chosen = _backend.select_backend("op", "auto", CPU, ("torch", "triton", "cpp"))
    expected = "cpp" if _backend.unusable_reason("cpp", CPU) is None else "torch"
    assert chosen == expected


def test_auto_never_picks_the_interpreter():
    assert _backend.select_backend("op", "auto", CPU, ("torch", "triton")) == "torch"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select_backend("op", "fast", CPU, ("torch",))


def test_backend_the_op_lacks_is_an_error():
    with pytest.raises(ValueError, match=r"backend='cuda' is not implemented for this op"):
        _backend.select_backend("op", "cuda", CPU, ("torch", "triton"))


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.select_backend("op", "cuda", CPU, ("torch", "cuda"))


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.select_backend("op", "triton", CPU, ("torch", "triton"))


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("DSATTN_BACKEND", "torch")
    assert _backend.select_backend("op", "auto", CPU, ("torch", "cpp")) == "torch"
    monkeypatch.setenv("DSATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="env DSATTN_BACKEND='cuda'"):
        _backend.select_backend("op", "auto", CPU, ("torch", "cuda"))
    monkeypatch.setenv("DSATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DSATTN_BACKEND must be one of"):
        _backend.select_backend("op", "auto", CPU, ("torch",))
