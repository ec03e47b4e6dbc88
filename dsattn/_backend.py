"""Backend selection shared by every functional op.

Backends: "triton" (Triton kernels; on CPU tensors only under TRITON_INTERPRET=1), "cuda" (compiled CUDA
kernels), "cpp" (compiled CPU kernels), "torch" (the PyTorch reference in dsattn.reference). "auto" (or the
env DSATTN_BACKEND) picks the fastest one of the op's backends that can run on the tensors' device and takes
the call, as declared in dsattn.capabilities.
"""

import contextlib
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from dsattn import _ext, capabilities

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
ENV_VAR = "DSATTN_BACKEND"
# Default "auto" preference per device type; an op may pass its own (e.g. CUDA GEMV before Triton for decode).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# Asked of the installation (imports, the dispatcher), not of tensors: torch.compile takes the answer as a
# constant instead of tracing it.
@torch.compiler.assume_constant_result
def unusable_reason(backend: str, device: torch.device, kernel: str | None = None) -> str | None:
    """None when `backend` can run on `device`, else why not. `kernel` names the compiled op for cuda/cpp."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got device {device}"
        if not _ext.cuda_loaded():
            return "the CUDA extension dsattn._C_cuda is not built or failed to load (see `python -m dsattn info`)"
        if kernel is not None and not _ext.has_kernel(kernel, "CUDA"):
            return f"this build of dsattn._C_cuda has no kernel for {kernel}"
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend needs CPU tensors, got device {device}"
        if not _ext.cpp_loaded():
            return "the CPU extension dsattn._C is not built or failed to load (see `python -m dsattn info`)"
        if kernel is not None and not _ext.has_kernel(kernel, "CPU"):
            return f"this build of dsattn._C has no kernel for {kernel}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


_RECORDINGS: list[dict] = []


@contextlib.contextmanager
def recording():
    """with recording() as chosen: ... -> chosen = {op: {backends selected while inside}} (what really ran)."""
    chosen: dict[str, set] = {}
    _RECORDINGS.append(chosen)
    try:
        yield chosen
    finally:
        _RECORDINGS.remove(chosen)


def _record(op: str, backend: str) -> str:
    for chosen in _RECORDINGS:
        chosen.setdefault(op, set()).add(backend)
    return backend


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of an op called on `tensors` now (a forward-mode tangent on one of
    them is an error: check_no_forward_ad)."""
    check_no_forward_ad(*tensors)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_no_forward_ad(*tensors) -> None:
    """dsattn's ops have no forward-mode AD rule, and a torch.library custom op called on a dual tensor (or under
    torch.func.jvp) returns a result without its tangent: refuse rather than return a silently wrong jvp."""
    if torch.compiler.is_compiling():
        return
    dual = forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if dual or torch._C._are_functorch_transforms_active() and any(
            i.key() == torch._C._functorch.TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        raise NotImplementedError(
            "dsattn: forward-mode AD (torch.autograd.forward_ad dual tensors, torch.func.jvp) is not supported by "
            "dsattn's ops: the tangent would be dropped; use reverse mode (backward, torch.func.grad/vjp)")


def select_backend(
    op: str,
    backend: str,
    device: torch.device,
    request: capabilities.Request,
    *,
    auto_order: Sequence[str] | None = None,
) -> str:
    """Resolve `backend` for `op` on `device` from the op's declared capabilities (dsattn.capabilities).

    "auto" (or env DSATTN_BACKEND=auto) takes the first backend of `auto_order` (default: AUTO_ORDER of the
    device) that can run here and takes `request` (dtype, limits, a backward when a gradient is needed); the
    torch backend takes everything. An explicit backend that the op lacks, that cannot run here or that
    refuses the request is an error naming the op, the backend and the limit.
    """
    return select(op, backend, device, request.dtype, request.grad, auto_order=auto_order,
                  head_dim=request.head_dim, top_k=request.top_k, group_size=request.group_size,
                  offset=request.offset)


def _env_values() -> tuple:
    """The raw values of the env vars the selection reads (DSATTN_BACKEND, TRITON_INTERPRET), read per call."""
    return os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET")


# Successful selections, keyed by everything select_backend reads: its arguments, the env vars it reads and
# the device type (unusable_reason's answers otherwise depend only on the installation, fixed once asked).
# Errors are not kept: a refused call raises from the full selection every time.
_SELECTED: dict[tuple, str] = {}
_SELECTED_MAX = 4096


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, grad: bool = False, *,
           auto_order: Sequence[str] | None = None, head_dim: int | None = None, top_k: int | None = None,
           group_size: int | None = None, offset: int = 0) -> str:
    """select_backend for a Request of these fields, without building it when the answer is cached."""
    if torch.compiler.is_compiling():  # traced once per graph: no cache for dynamo to guard on
        request = capabilities.Request(dtype=dtype, grad=grad, head_dim=head_dim, top_k=top_k,
                                       group_size=group_size, offset=offset)
        return _record(op, _select(op, backend, device, request, auto_order))
    key = (op, backend, device.type, dtype, grad, auto_order, head_dim, top_k, group_size, offset, *_env_values())
    try:
        chosen = _SELECTED.get(key)
    except TypeError:  # an unhashable argument (a list order, a bad backend): the full selection judges it
        key, chosen = None, None
    if chosen is None:
        request = capabilities.Request(dtype=dtype, grad=grad, head_dim=head_dim, top_k=top_k,
                                       group_size=group_size, offset=offset)
        chosen = _select(op, backend, device, request, auto_order)
        if key is not None:
            if len(_SELECTED) >= _SELECTED_MAX:
                _SELECTED.clear()
            _SELECTED[key] = chosen
    if _RECORDINGS:
        _record(op, chosen)
    return chosen


def _select(op: str, backend: str, device: torch.device, request: capabilities.Request,
            auto_order: Sequence[str] | None) -> str:
    declared = capabilities.of(op)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"dsattn.{op}: backend must be one of {BACKENDS}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"dsattn.{op}: env {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        backend, source = env, f"env {ENV_VAR}"
    if backend != "auto":
        if backend not in declared:
            raise ValueError(f"dsattn.{op}: {source}={backend!r} is not implemented for this op; it has "
                             f"{tuple(declared)}")
        reason = unusable_reason(backend, device, declared[backend].kernel)
        if reason is not None:
            raise ValueError(f"dsattn.{op}: {source}={backend!r} cannot run here: {reason}")
        refusal = declared[backend].refusal(request)
        if refusal is not None:
            raise type(refusal)(f"dsattn.{op}: {source}={backend!r} {refusal}")
        return backend
    order = auto_order or AUTO_ORDER.get(device.type, ("torch",))
    for candidate in (*order, "torch"):
        capability = declared.get(candidate)
        if capability is not None and unusable_reason(candidate, device, capability.kernel) is None \
                and capability.refusal(request) is None:
            return candidate
    raise ValueError(f"dsattn.{op}: no backend takes this call on {device}: "
                     + "; ".join(f"{name} {declared[name].refusal(request)}" for name in declared))


def plain_eager(*tensors) -> bool:
    """Whether a call on `tensors` (None allowed) may run an op's implementation without the custom op's
    dispatch: eager, plain tensors (no subclass, fake or DTensor), no torch function / dispatch mode and no
    functorch transform for the op's dispatch to serve. The caller still goes through the op when autograd
    wants a gradient, so that the op's backward is recorded."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    return True


# nn.Parameter's __torch_function__ is disabled: it dispatches as a plain tensor.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def check_backward(op: str, backend: str) -> None:
    """Backward of a call that ran on `backend`: the selection only lets a backend without one run when no
    gradient was wanted, so reaching here without one is a bug, reported instead of a wrong gradient."""
    if not capabilities.of(op)[backend].backward:
        raise RuntimeError(f"dsattn.{op}: backend={backend!r} has no backward, but autograd reached it")
