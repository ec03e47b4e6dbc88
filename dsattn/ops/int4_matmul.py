"""int4_matmul: the custom op torch.ops.dsattn.int4_matmul and its functional entry dsattn.int4_matmul
(validate, pick a backend from dsattn.capabilities, call the op): x @ w.dequantize().T (+ bias) without
materializing the dequantized weight.

The op takes the Int4Weight's fields (x, qweight, scales, zeros, group_size, input_scale, bias, backend); the
entry unpacks the Int4Weight. Gradients: x and bias (the int4 weight is frozen), computed by the torch
backend's chunked dequant whichever backend ran the forward; the compiled and Triton kernels declare no
backward, so with a gradient wanted "auto" takes the torch backend.
"""

from typing import Optional

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.quant.int4 import check_int4_weight
from dsattn.torch_backend import int4_matmul as _torch

OP = "int4_matmul"
# Decode (M <= 16 rows of x) goes to the CUDA GEMV when it is built, larger M to Triton's tensor-core tiles.
CUDA_GEMV_MAX_M = 16


def _auto_order(device: torch.device, m: int):
    if device.type == "cuda":
        return ("cuda", "triton", "torch") if m <= CUDA_GEMV_MAX_M else ("triton", "cuda", "torch")
    return ("cpp", "torch")


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, grad: bool, group_size: int | None,
           auto_order) -> str:
    """_backend.select_backend for a Request(dtype, grad, group_size)."""
    request = capabilities.Request(dtype=dtype, grad=grad, group_size=group_size)
    return _backend.select_backend(op, backend, device, request, auto_order=auto_order)


def check_frozen(op: str, **tensors) -> None:
    """The int4 weight gets no gradient: a field that requires one is an error, not a silently dropped grad."""
    for name, t in tensors.items():
        if _backend.needs_grad(t):
            raise ValueError(f"dsattn.{op}: {name} requires grad, but the int4 weight is frozen (gradients reach "
                             "x and bias only); detach it")


def _int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 backend: str) -> torch.Tensor:
    n, k = qweight.shape[0], x.shape[-1]
    if backend == "torch":
        return _torch.int4_matmul(x, qweight, scales, zeros, group_size, input_scale, bias)
    x2 = x.reshape(-1, k)
    if backend == "cpp":
        # bf16 stays bf16 (the kernel's prefill path runs a bf16 GEMM); everything else computes in fp32.
        x2 = x2 if x2.dtype == torch.bfloat16 else x2.float()
        if input_scale is not None:
            x2 = x2 * input_scale.to(x2.dtype)
        out = torch.ops.dsattn_C.int4_matmul(x2, qweight, scales.float(), zeros, group_size,
                                             None if bias is None else bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], n)
    if input_scale is not None:
        x2 = x2 * input_scale.to(x2.dtype)
    if backend == "cuda":
        out = torch.ops.dsattn_C.int4_matmul(x2, qweight, scales, zeros, group_size, bias)
    else:
        from dsattn.triton_kernels import int4_matmul as _triton

        out = _triton.int4_matmul(x2, qweight, scales, zeros, group_size, bias)
    return out.reshape(*x.shape[:-1], n)


int4_matmul_op = define_op(OP, _int4_matmul)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, input_scale, bias, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros, input_scale)
    ctx.group_size, ctx.backend = group_size, backend
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    qweight, scales, zeros, input_scale = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[6]
    dx = _torch.int4_matmul_backward_x(grad_out, qweight, scales, zeros, ctx.group_size, input_scale,
                                       x_dtype=ctx.x_dtype) if need_x else None
    dbias = _torch.bias_backward(grad_out, ctx.bias_dtype) if need_bias else None
    return dx, None, None, None, None, None, dbias, None


int4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def int4_matmul(x, w, bias=None, *, backend="auto"):
    """x [..., K] (fp16/bf16/fp32/fp64), w: Int4Weight [N, K] -> [..., N] in x's dtype.

    Backends: "cuda" (GEMV / small-M kernel, fp16/bf16/fp32 x), "triton" (dequant GEMM with split-K for
    few output tiles; fp16/bf16 x, fp32 x as tf32x3; group_size % 16 == 0), "cpp" (CPU, fp32 accuracy:
    exact fp32 products of the dequantized weight, AVX-512 / AVX2 / portable by DSATTN_CPU_ISA; decode with
    M < 4 rows on AVX512-VNNI CPUs (K % 128 == 0, group 32, 64 or a multiple of 128) splits x into int8 digits
    per 128 values for VPDPBUSD: three for fp32 x (|x - digits| <= 2^-15 of the block scale, 2.4e-7 of its
    largest |x|), two for bf16 x (3.1e-5 of it, below bf16's rounding; DSATTN_INT4_VNNI=0 turns it off); from
    64 rows dequantized panels + GEMM, bf16 x from 16 rows a bf16 GEMM), "torch" (chunked dequant; the only one
    for float64 and the one with a backward). "auto" on CUDA: cuda for M <= 16 rows, else triton; on CPU cpp; torch when a gradient
    (x or bias requiring grad) is wanted.
    """
    _checks.check_tensor(OP, "x", x, dtypes=_checks.FLOAT_DTYPES)
    n, k = check_int4_weight(OP, w)
    _checks.check_matmul_x_bias(OP, x, bias, n, k)
    _checks.check_same_device(OP, x=x, qweight=w.qweight, bias=bias)
    check_frozen(OP, **{"w.scales": w.scales, "w.input_scale": w.input_scale})
    m = x.numel() // k if k else 0
    chosen = select(OP, backend, x.device, x.dtype, _backend.needs_grad(x, bias), w.group_size,
                    _auto_order(x.device, m))
    return int4_matmul_op(x, w.qweight, w.scales, w.zeros, w.group_size, w.input_scale, bias, chosen)
