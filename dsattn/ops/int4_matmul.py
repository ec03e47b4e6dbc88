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

from dsattn import _backend, _checks, _ext
from dsattn._library import define_op
from dsattn.quant.int4 import check_int4_weight, well_formed_shape
from dsattn.torch_backend import int4_matmul as _torch

OP = "int4_matmul"
# Decode (M <= 16 rows of x) goes to the CUDA GEMV when it is built, larger M to Triton's tensor-core tiles.
CUDA_GEMV_MAX_M = 16


def _auto_order(device_type: str, m: int):
    if device_type == "cuda":
        return ("cuda", "triton", "torch") if m <= CUDA_GEMV_MAX_M else ("triton", "cuda", "torch")
    return ("cpp", "torch")


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, grad: bool, group_size: int | None,
           auto_order) -> str:
    """_backend.select_backend for a Request(dtype, grad, group_size) (cached by _backend.select)."""
    return _backend.select(op, backend, device, dtype, grad, auto_order=auto_order, group_size=group_size)


def check_frozen(op: str, **tensors) -> None:
    """The int4 weight gets no gradient: a field that requires one is an error, not a silently dropped grad."""
    if not torch.is_grad_enabled():
        return
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
    two_d = x.dim() == 2
    x2 = x if two_d else x.reshape(-1, k)
    if backend == "cpp":
        # bf16 stays bf16 (the kernel's prefill path runs a bf16 GEMM); everything else computes in fp32.
        # Conversions only where a dtype differs: each call is a dispatch on the decode path.
        if x2.dtype != torch.bfloat16:
            x2 = as_float32(x2)
        if input_scale is not None:
            x2 = x2 * input_scale.to(x2.dtype)
        out = _ext.compiled_op("int4_matmul")(x2, qweight, as_float32(scales), zeros, group_size, as_float32(bias))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if two_d else out.reshape(*x.shape[:-1], n)
    if input_scale is not None:
        x2 = x2 * input_scale.to(x2.dtype)
    if backend == "cuda":
        out = _ext.compiled_op("int4_matmul")(x2, qweight, scales, zeros, group_size, bias)
    else:
        from dsattn.triton_kernels import int4_matmul as _triton

        out = _triton.int4_matmul(x2, qweight, scales, zeros, group_size, bias)
    return out.reshape(*x.shape[:-1], n)


def as_float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == torch.float32 else t.float()


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
    exact fp32 products of the dequantized weight, AVX-512 / AVX2 / portable by DSATTN_CPU_ISA; decode on
    AVX512-VNNI CPUs (K % 128 == 0, group 32, 64 or a multiple of 128), fp32 x below 4 rows and bf16 x below
    16 (8 on AMX CPUs), splits x into int8 digits per 128 values for VPDPBUSD: three for fp32 x (|x - digits| <= 2^-15 of the
    block scale, 2.4e-7 of its largest |x|), two for bf16 x (3.1e-5 of it, below bf16's rounding;
    DSATTN_INT4_VNNI=0 turns it off); bf16 x dequantizes weight tiles into oneDNN's brgemm micro-kernel,
    on AMX CPUs from 8 rows, else from 16 on oneDNN's AVX512-BF16 kernel (Zen 4; DSATTN_INT4_AMX=0 turns
    both off); otherwise from 64 rows dequantized panels + GEMM, bf16 x from 16 rows a bf16 GEMM), "torch" (chunked dequant; the only one for float64 and the one with a backward).
    "auto" on CUDA: cuda for M <= 16 rows, else triton; on CPU cpp; torch when a gradient (x or bias requiring
    grad) is wanted.
    """
    grad_enabled = torch.is_grad_enabled()
    shape = well_formed_shape(w)
    if shape is None or not _checks.matmul_call_ok(x, bias, *shape, w.qweight.device) or grad_enabled and (
            w.scales.requires_grad or w.input_scale is not None and w.input_scale.requires_grad):
        _checks.check_tensor(OP, "x", x, dtypes=_checks.FLOAT_DTYPES)
        shape = check_int4_weight(OP, w)
        _checks.check_matmul_x_bias(OP, x, bias, *shape)
        _checks.check_same_device(OP, x=x, qweight=w.qweight, bias=bias)
        check_frozen(OP, **{"w.scales": w.scales, "w.input_scale": w.input_scale})
    k = shape[1]
    qweight, scales, zeros, group_size, input_scale = w.qweight, w.scales, w.zeros, w.group_size, w.input_scale
    device = x.device
    m = x.numel() // k if k else 0
    _backend.check_no_forward_ad(x, bias)
    grad = grad_enabled and (x.requires_grad or bias is not None and bias.requires_grad)  # _backend.needs_grad
    chosen = select(OP, backend, device, x.dtype, grad, group_size, _auto_order(device.type, m))
    if not grad and chosen in ("cpp", "cuda") and _backend.plain_eager(x, qweight, scales, zeros, input_scale, bias):
        # No gradient, no tracer or mode for the op's dispatch to serve: the op would only forward here. The
        # selection above recorded the backend (_backend.recording sees this call too).
        return _int4_matmul(x, qweight, scales, zeros, group_size, input_scale, bias, chosen)
    return int4_matmul_op(x, qweight, scales, zeros, group_size, input_scale, bias, chosen)
