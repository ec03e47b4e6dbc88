"""Loads the compiled extensions (dsattn._C for CPU ops and their schemas, dsattn._C_cuda for CUDA kernels).

The package works without them: every op then runs on its Triton or PyTorch path. Load errors are kept for
`python -m dsattn info` instead of being raised.
"""

import functools
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


@functools.cache
def compiled_op(name: str):
    """torch.ops.dsattn_C.<name>.default, looked up once, so that per-call entries skip the attribute walk (called
    after the backend selection has loaded the extension)."""
    return getattr(torch.ops.dsattn_C, name).default


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

    @torch.library.register_fake("dsattn_C::int8_matmul")
    def _(x, qweight, scales, group_size, bias=None, isa=-1):
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("dsattn_C::topk_select")
    def _(scores, lengths, k):
        return scores.new_empty((scores.shape[0], k), dtype=torch.int32)

    if hasattr(torch.ops.dsattn_C, "lightning_indexer_topk"):  # builds before it lack the op

        @torch.library.register_fake("dsattn_C::lightning_indexer_topk")
        def _(q, k, weights, top_k, causal, isa=-1):
            return q.new_empty((q.shape[0], q.shape[1], top_k), dtype=torch.int32)

    @torch.library.register_fake("dsattn_C::sliding_window_attention")
    def _(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, window, causal, scale, isa=-1):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    @torch.library.register_fake("dsattn_C::sparse_attention")
    def _(q, k, v, indices, causal, scale, isa=-1):
        return q.new_empty((*q.shape[:-1], v.shape[-1]))

    if hasattr(torch.ops.dsattn_C, "paged_sliding_window_attention"):  # builds before it lack the op

        @torch.library.register_fake("dsattn_C::paged_sliding_window_attention")
        def _(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, sinks, window, scale, isa=-1):
            return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))

    if hasattr(torch.ops.dsattn_C, "linear_attention"):  # builds before it lack the op

        @torch.library.register_fake("dsattn_C::linear_attention")
        def _(q, k, v, S0, z0, feature_map, causal, normalize, eps, isa=-1):
            b, hq, sq, dk = q.shape
            dv = v.shape[-1]
            return (q.new_empty((b, hq, sq, dv)), q.new_empty((b, hq, dk, dv), dtype=torch.float32),
                    q.new_empty((b, hq, dk), dtype=torch.float32))

    if hasattr(torch.ops.dsattn_C, "hybrid_attention"):  # builds before it lack the op

        @torch.library.register_fake("dsattn_C::hybrid_attention")
        def _(q, k, v, prefix, window, feature_map, scale, isa=-1):
            return q.new_empty((*q.shape[:-1], v.shape[-1]))


def load_errors() -> dict[str, str]:
    cuda_loaded()
    return dict(_errors)


def cpu_info() -> dict:
    """The CPU model (from /proc/cpuinfo where there is one) and which ISA path the CPU attention kernels take
    (portable / avx2 / avx512; None without the extension): recorded next to CPU benchmark results."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    isa = None
    if has_kernel("sliding_window_attention", "CPU"):
        isa = CPU_ISA_NAMES[torch.ops.dsattn_C.attention_isa(-1)]
    return {"cpu_model": model, "cpu_threads": torch.get_num_threads(), "attention_isa": isa}


CPU_ISA_NAMES = ("portable", "avx2", "avx512")


def cpu_isas() -> list:
    """The CPU kernels' ISA paths (0 portable, 1 avx2, 2 avx512) this CPU and build can run; [] without them."""
    if not has_kernel("sliding_window_attention", "CPU"):
        return []
    found = []
    for isa in range(len(CPU_ISA_NAMES)):
        try:
            torch.ops.dsattn_C.attention_isa(isa)
        except RuntimeError:
            continue
        found.append(isa)
    return found


def build_info() -> dict:
    try:
        from dsattn import _build_info as info
    except ImportError:
        return {}
    return {k: v for k, v in vars(info).items() if k.isupper()}
