"""dsattn.int4_matmul: x @ w.dequantize().T (+ bias) without materializing the dequantized weight."""

import torch

from dsattn import _backend, _checks
from dsattn.quant.int4 import Int4Weight
from dsattn.reference.int4 import int4_matmul as _int4_matmul_torch

OP = "int4_matmul"
IMPLEMENTED = ("torch", "cpp", "triton", "cuda")
KERNELS = {"cpp": OP, "cuda": OP}
# Decode (M <= 16 rows of x) goes to the CUDA GEMV when it is built, larger M to Triton's tensor-core tiles.
CUDA_GEMV_MAX_M = 16
TRITON_GROUP_MULTIPLE = 16  # dsattn.triton_kernels.int4_matmul.MIN_BLOCK_K (not imported: Triton is optional)


def _auto_order(device: torch.device, m: int):
    if device.type == "cuda":
        return ("cuda", "triton", "torch") if m <= CUDA_GEMV_MAX_M else ("triton", "cuda", "torch")
    return ("cpp", "torch")


def int4_matmul(x, w, bias=None, *, backend="auto"):
    """x [..., K] (fp16/bf16/fp32/fp64), w: Int4Weight [N, K] -> [..., N] in x's dtype.

    Backends: "cuda" (GEMV / small-M kernel, fp16/bf16/fp32 x), "triton" (dequant GEMM with split-K for
    few output tiles; fp16/bf16 x, fp32 x as tf32x3; group_size % 16 == 0), "cpp" (CPU, computes in fp32),
    "torch" (the reference; the only one for float64). "auto" on CUDA: cuda for M <= 16 rows, else triton.
    """
    _checks.check_tensor(OP, "x", x, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(w, Int4Weight):
        raise TypeError(f"dsattn.{OP}: w must be a dsattn.Int4Weight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dsattn.{OP}: x's last dim must be K={k}, got shape {tuple(x.shape)}")
    _checks.check_same_device(OP, x=x, qweight=w.qweight, bias=bias)
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        if bias.shape[0] != n:
            raise ValueError(f"dsattn.{OP}: bias must have N={n} elements, got {bias.shape[0]}")
    x2 = x.reshape(-1, k)
    # float64 keeps its precision on the reference; the kernels compute in float32.
    implemented = IMPLEMENTED if x.dtype != torch.float64 else ("torch",)
    if backend == "auto" and w.group_size % TRITON_GROUP_MULTIPLE != 0:
        implemented = tuple(b for b in implemented if b != "triton")
    chosen = _backend.select_backend(OP, backend, x.device, implemented, kernels=KERNELS,
                                     auto_order=_auto_order(x.device, x2.shape[0]))
    if chosen == "torch":
        return _int4_matmul_torch(x, w.qweight, w.scales, w.zeros, w.group_size, w.input_scale, bias)
    if chosen == "cpp":
        x2 = x2.float()
        if w.input_scale is not None:
            x2 = x2 * w.input_scale.float()
        bias32 = None if bias is None else bias.float()
        out = torch.ops.dsattn.int4_matmul(x2, w.qweight, w.scales.float(), w.zeros, w.group_size, bias32)
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if w.input_scale is not None:
        x2 = x2 * w.input_scale.to(x2.dtype)
    if chosen == "cuda":
        out = torch.ops.dsattn.int4_matmul(x2, w.qweight, w.scales, w.zeros, w.group_size, bias)
    else:
        from dsattn.triton_kernels import int4_matmul as _triton

        out = _triton.int4_matmul(x2, w.qweight, w.scales, w.zeros, w.group_size, bias)
    return out.reshape(*x.shape[:-1], n)
