"""Shared pieces for the Triton kernels: interpreter detection, dtype names, and the AOT spec record."""

import dataclasses
import os
from typing import Any

import torch
import triton
import triton.language as tl

TRITON_DTYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
}


@triton.jit
def tile_coords(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid over a grid_m x grid_n grid of output tiles, ordered in bands of GROUP_M
    row tiles (a band's programs share weight tiles in L2): the GEMM kernels' program order."""
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    band_rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % band) % band_rows, (pid % band) // band_rows


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1. Kernels use it to upcast bf16 tl.dot operands (the interpreter
    multiplies bf16 bit patterns) and to pick one config instead of autotuning (which needs a driver)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def ptr(dtype: torch.dtype) -> str:
    """AOT signature string of a pointer to dtype, e.g. '*bf16'."""
    return "*" + TRITON_DTYPE[dtype]


@dataclasses.dataclass
class AOTSpec:
    """One launchable kernel config: what `triton.compile(ASTSource(kernel, signature, constexprs))` needs."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None  # ptxas register cap per thread (None: ptxas's own heuristic)
    hot: bool = True  # a config used on the fast path: must not spill
    # Arguments the JIT would see as multiples of 16 (pointers, strides of 16-aligned rows): it specializes
    # them (tt.divisibility), which is what lets loads vectorize; an AOT compile without this overstates
    # registers.
    divisible_by_16: tuple[str, ...] = ()
    # Per-architecture configs (tile, warps, stages differ between sm_80 and sm_90): {capability: overrides of
    # num_warps / num_stages / maxnreg, and "constexprs" merged over constexprs}. A compile for sm_XX takes
    # the entry of the largest capability <= XX, as the launcher does (config_capability).
    per_capability: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def for_capability(self, capability: int) -> "AOTSpec":
        """This spec as compiled for sm_<capability>."""
        key = config_capability(capability, self.per_capability)
        if key is None:
            return self
        overrides = dict(self.per_capability[key])
        constexprs = {**self.constexprs, **overrides.pop("constexprs", {})}
        return dataclasses.replace(self, constexprs=constexprs, per_capability={}, **overrides)


def config_capability(capability: int, keys) -> int | None:
    """The largest of `keys` (capabilities a kernel has a config for) at or below `capability`, else the
    smallest; None when there are none."""
    keys = sorted(keys)
    if not keys:
        return None
    return max((k for k in keys if k <= capability), default=keys[0])


def device_capability(device: torch.device) -> int:
    """sm_XX of a CUDA device as XX (e.g. 90); 80 elsewhere (the interpreter on CPU runs the sm_80 configs)."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def long_offsets(*tensors) -> bool:
    """Whether an element offset within one of `tensors` (from its data pointer, where kernels index from)
    can pass int32: the launchers then set a kernel's LONG_OFFSETS (64-bit offsets where they grow)."""
    from dsattn import capabilities

    return capabilities.max_offset(*tensors) > capabilities.INT32_OFFSETS


class launch:
    """`launch(kernel)[grid](*args, **kwargs)`: how every launcher starts a kernel, so that dsattn's custom ops
    (torch.library.triton_op, dsattn._library) trace. Compiled Triton goes through torch.library.wrap_triton
    (inductor sees the kernel). Under the interpreter the kernel runs directly, and not at all on fake tensors
    (the op is opaque there and its fake kernel only needs the outputs' shapes)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if interpreting():
                if any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
                    return None
                return self.kernel[grid](*args, **kwargs)
            return torch.library.wrap_triton(self.kernel)[grid](*args, **kwargs)

        return run


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)
