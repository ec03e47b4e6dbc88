"""Loads the compiled extensions (dsattn._C for CPU ops and their schemas, dsattn._C_cuda for CUDA kernels).

The package works without them: every op then runs on its Triton or PyTorch path. Load errors are kept for
`python -m dsattn info` instead of being raised.
"""

import importlib

import torch

_errors: dict[str, str] = {}
_loaded: dict[str, bool] = {}


def _load(name: str) -> bool:
    if name not in _loaded:
        try:
            importlib.import_module(name)
            _loaded[name] = True
        except Exception as exc:  # ImportError, or an OSError/undefined symbol from a torch mismatch
            _loaded[name] = False
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def cpp_loaded() -> bool:
    """True when dsattn._C (CPU kernels and every op's schema) is importable."""
    return _load("dsattn._C")


def cuda_loaded() -> bool:
    """True when dsattn._C_cuda is importable (it needs dsattn._C first: that one declares the schemas)."""
    return cpp_loaded() and _load("dsattn._C_cuda")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.dsattn.<op> has a compiled kernel for dispatch_key ("CPU" or "CUDA")."""
    loaded = cuda_loaded() if dispatch_key == "CUDA" else cpp_loaded()
    if not loaded:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dsattn::{op}", dispatch_key)
    except RuntimeError:  # op not declared in this build
        return False


def load_errors() -> dict[str, str]:
    cuda_loaded()
    return dict(_errors)


def build_info() -> dict:
    try:
        from dsattn import _build_info as info
    except ImportError:
        return {}
    return {k: v for k, v in vars(info).items() if k.isupper()}
