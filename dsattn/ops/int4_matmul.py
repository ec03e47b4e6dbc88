"""dsattn.int4_matmul: x @ w.dequantize().T (+ bias) without materializing the dequantized weight, and
dsattn.int4_grouped_matmul: the same per MoE expert, every expert in one call."""

import torch

from dsattn import _backend, _checks
from dsattn.quant.int4 import Int4Weight, check_group_size
from dsattn.reference.int4 import int4_grouped_matmul as _int4_grouped_matmul_torch
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
    few output tiles; fp16/bf16 x, fp32 x as tf32x3; group_size % 16 == 0), "cpp" (CPU, computes in fp32,
    except bf16 x from 16 rows: a bf16 GEMM), "torch" (the reference; the only one for float64). "auto" on
    CUDA: cuda for M <= 16 rows, else triton.
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
        # bf16 stays bf16 (the kernel's prefill path runs a bf16 GEMM); everything else computes in fp32.
        x2 = x2 if x2.dtype == torch.bfloat16 else x2.float()
        if w.input_scale is not None:
            x2 = x2 * w.input_scale.to(x2.dtype)
        bias32 = None if bias is None else bias.float()
        out = torch.ops.dsattn_C.int4_matmul(x2, w.qweight, w.scales.float(), w.zeros, w.group_size, bias32)
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if w.input_scale is not None:
        x2 = x2 * w.input_scale.to(x2.dtype)
    if chosen == "cuda":
        out = torch.ops.dsattn_C.int4_matmul(x2, w.qweight, w.scales, w.zeros, w.group_size, bias)
    else:
        from dsattn.triton_kernels import int4_matmul as _triton

        out = _triton.int4_matmul(x2, w.qweight, w.scales, w.zeros, w.group_size, bias)
    return out.reshape(*x.shape[:-1], n)


GROUPED_OP = "int4_grouped_matmul"
GROUPED_IMPLEMENTED = ("torch", "cpp", "triton")
GROUPED_KERNELS = {"cpp": OP}  # cpp: the compiled int4_matmul, one expert at a time


def _cpp_expert_matmul(x_dtype):
    """The compiled CPU int4_matmul as the reference's per-expert GEMM. The reference hands over fp32 rows;
    for bf16 x they go back to bf16 (exactly: they came from bf16) so that the kernel's bf16 GEMM path runs."""
    def expert_matmul(x_rows, qweight, scales, zeros, group_size):
        if x_dtype == torch.bfloat16:
            x_rows = x_rows.to(torch.bfloat16)
        out = torch.ops.dsattn_C.int4_matmul(x_rows, qweight.contiguous(), scales.float().contiguous(),
                                           zeros.contiguous(), group_size, None)
        return out.float()

    return expert_matmul


def int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, weights=None, *, backend="auto"):
    """MoE experts' int4 GEMM: row m of x [M, K] goes through the experts expert_ids[m, s] (int32/int64
    [M, S], or [M] for one each) of the stacked weights qweight int32 [E, N, K/8], scales [E, N, K/g], zeros
    uint8 [E, N, K/g] (dsattn.quant.int4's layout per expert):
    out[m, s] = x[m] @ dequantize(W[expert_ids[m, s]]).T (* weights[m, s]), shape [*expert_ids.shape, N] in
    x's dtype. Ids outside [0, E) (transformers' dropped slots carry E) give zero rows. weights (float, shaped
    like expert_ids) are applied in fp32 before the one rounding (MoE routing weights).

    Backends: "triton" (all experts in one launch, routing sorted on the device: no host sync; fp16/bf16 x,
    fp32 x as tf32x3; group_size % 16 == 0), "cpp" (CPU: the compiled int4_matmul per expert present),
    "torch" (the reference, per expert; the only one for float64). auto: triton on CUDA, cpp on CPU."""
    op = GROUPED_OP
    _checks.check_tensor(op, "x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "qweight", qweight, ndim=3, dtypes=(torch.int32,))
    _checks.check_tensor(op, "scales", scales, ndim=3, dtypes=_checks.FLOAT_DTYPES[:3])
    _checks.check_tensor(op, "zeros", zeros, ndim=3, dtypes=(torch.uint8,))
    _checks.check_tensor(op, "expert_ids", expert_ids, dtypes=_checks.INDEX_DTYPES)
    num_experts, n, k = qweight.shape[0], qweight.shape[1], qweight.shape[2] * 8
    check_group_size(op, group_size, k)
    if x.shape[1] != k:
        raise ValueError(f"dsattn.{op}: x must be [M, K={k}] (K = qweight.shape[2] * 8), got shape {tuple(x.shape)}")
    groups = (num_experts, n, k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != groups:
            raise ValueError(f"dsattn.{op}: {name} must be [E, N, K/group_size] = {list(groups)}, "
                             f"got {list(t.shape)}")
    if expert_ids.dim() not in (1, 2) or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"dsattn.{op}: expert_ids must be [M={x.shape[0]}] or [M={x.shape[0]}, slots], "
                         f"got shape {tuple(expert_ids.shape)}")
    if weights is not None:
        _checks.check_tensor(op, "weights", weights, dtypes=_checks.FLOAT_DTYPES)
        if weights.shape != expert_ids.shape:
            raise ValueError(f"dsattn.{op}: weights must be shaped like expert_ids {tuple(expert_ids.shape)}, "
                             f"got {tuple(weights.shape)}")
    _checks.check_same_device(op, x=x, qweight=qweight, scales=scales, zeros=zeros, expert_ids=expert_ids,
                              weights=weights)
    slots = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    out_shape = (*expert_ids.shape, n)
    implemented = GROUPED_IMPLEMENTED if x.dtype != torch.float64 else ("torch",)
    if backend == "auto" and group_size % TRITON_GROUP_MULTIPLE != 0:
        implemented = tuple(b for b in implemented if b != "triton")
    chosen = _backend.select_backend(op, backend, x.device, implemented, kernels=GROUPED_KERNELS,
                                     auto_order=("triton", "torch") if x.device.type == "cuda" else ("cpp", "torch"))
    if chosen == "triton" and group_size % TRITON_GROUP_MULTIPLE != 0:
        raise ValueError(f"dsattn.{op}: the Triton kernel needs group_size % {TRITON_GROUP_MULTIPLE} == 0, got "
                         f"{group_size}; use backend='cpp' or 'torch'")
    ids = expert_ids.reshape(-1)
    flat_weights = None if weights is None else weights.reshape(-1)
    if chosen == "triton":
        from dsattn.triton_kernels import int4_grouped_matmul as _triton

        out = _triton.int4_grouped_matmul(x, qweight, scales, zeros, group_size, ids, slots, flat_weights)
    else:
        out = _int4_grouped_matmul_torch(x, qweight, scales, zeros, group_size, ids, slots, flat_weights,
                                         expert_matmul=_cpp_expert_matmul(x.dtype) if chosen == "cpp" else None)
    return out.reshape(out_shape)
