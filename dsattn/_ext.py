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
    """True when dsattn._C (CPU kernels and every compiled kernel's schema) is importable."""
    if _load("dsattn._C") and not _fakes_registered:
        _register_fakes()
    return _loaded["dsattn._C"]


def cuda_loaded() -> bool:
    """True when dsattn._C_cuda is importable (it needs dsattn._C first: that one declares the schemas)."""
    return cpp_loaded() and _load("dsattn._C_cuda")


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.dsattn_C.<op> has a compiled kernel for dispatch_key ("CPU" or "CUDA")."""
    loaded = cuda_loaded() if dispatch_key == "CUDA" else cpp_loaded()
    if not loaded:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dsattn_C::{op}", dispatch_key)
    except RuntimeError:  # op not declared in this build
        return False


_fakes_registered = False


def _register_fakes() -> None:
    """Fake (meta) kernels of torch.ops.dsattn_C.*, so that the public ops' cpp / cuda backends trace under
    torch.compile and FakeTensorMode. Shapes as declared in csrc/registration.cpp."""
    global _fakes_registered
    _fakes_registered = True

    @torch.library.register_fake("dsattn_C::int4_unpack")
    def _(qweight):
        return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 8), dtype=torch.uint8)

    @torch.library.register_fake("dsattn_C::int4_matmul")
    def _(x, qweight, scales, zeros, group_size, bias=None):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("dsattn_C::topk_select")
    def _(scores, lengths, k):
        return scores.new_empty((scores.shape[0], k), dtype=torch.int32)


def load_errors() -> dict[str, str]:
    cuda_loaded()
    return dict(_errors)


def build_info() -> dict:
    try:
        from dsattn import _build_info as info
    except ImportError:
        return {}
    return {k: v for k, v in vars(info).items() if k.isupper()}
