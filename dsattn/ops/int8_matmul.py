"""int8_matmul: the custom op torch.ops.dsattn.int8_matmul and its functional entry dsattn.int8_matmul
(validate, pick a backend from dsattn.capabilities, call the op): x @ w.dequantize().T (+ bias) without
materializing the dequantized weight.

The op takes the Int8Weight's fields (x, qweight, scales, group_size, bias, backend); the entry unpacks the
Int8Weight. Gradients: x and bias (the int8 weight is frozen), computed by the torch backend's chunked
dequant whichever backend ran the forward; the Triton kernel declares no backward, so with a gradient
wanted "auto" takes the torch backend.
"""

from typing import Optional

import torch

from dsattn import _backend, _checks, _ext
from dsattn._library import define_op
from dsattn.ops.int4_matmul import as_float32, select
from dsattn.quant.int8 import check_int8_weight, well_formed_shape
from dsattn.torch_backend import int8_matmul as _torch
from dsattn.torch_backend.int4_matmul import bias_backward

OP = "int8_matmul"


def check_frozen(**tensors) -> None:
    """The int8 weight gets no gradient: a scale that requires one is an error, not a silently dropped grad."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if _backend.needs_grad(t):
            raise ValueError(f"dsattn.{OP}: {name} requires grad, but the int8 weight is frozen (gradients reach "
                             "x and bias only); detach it")


def _auto_order(device_type: str):
    return ("triton", "torch") if device_type == "cuda" else ("cpp", "torch")


def _int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: Optional[int],
                 bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "torch":
        return _torch.int8_matmul(x, qweight, scales, group_size, bias)
    n, k = qweight.shape[0], x.shape[-1]
    if backend == "cpp":
        # bf16 stays bf16 (the kernel's prefill path runs a bf16 GEMM); everything else computes in fp32.
        two_d = x.dim() == 2
        x2 = x if two_d else x.reshape(-1, k)
        if x2.dtype != torch.bfloat16:
            x2 = as_float32(x2)
        out = _ext.compiled_op("int8_matmul")(x2, qweight, as_float32(scales), group_size, as_float32(bias))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if two_d else out.reshape(*x.shape[:-1], n)
    from dsattn.triton_kernels import int8_matmul as _triton

    out = _triton.int8_matmul(x.reshape(-1, k), qweight, scales, group_size, bias)
    return out.reshape(*x.shape[:-1], n)


int8_matmul_op = define_op(OP, _int8_matmul)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, group_size, bias, backend = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.group_size, ctx.backend = group_size, backend
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    qweight, scales = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    dx = _torch.int8_matmul_backward_x(grad_out, qweight, scales, ctx.group_size,
                                       x_dtype=ctx.x_dtype) if need_x else None
    dbias = bias_backward(grad_out, ctx.bias_dtype) if need_bias else None
    return dx, None, None, None, dbias, None


int8_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def int8_matmul(x, w, bias=None, *, backend="auto"):
    """x [..., K] (fp16/bf16/fp32/fp64), w: Int8Weight [N, K] -> [..., N] in x's dtype.

    Backends: "triton" (CUDA; int8 tiles dequantized in the K loop, fp32 accumulation; fp16/bf16 x, fp32 x as
    tf32x3; grouped scales need group_size % 16 == 0), "torch" (row-chunked dequant, on the CPU torch's own
    int8 GEMM for fp16/bf16 x with per-channel scales; the only one for float64 and the one with a
    backward), "cpp" (CPU, compiled: int8 codes widened to fp32 in registers for M < 64 rows, exact products
    and fp32 accumulation, x never quantized; on AVX512-VNNI CPUs below 4 rows with K % 128 == 0 and per-channel
    or group_size % 128 == 0 scales, x as int8 digits per 128 values (three for fp32 x: residual <= 2.4e-7 of
    the block max; two for bf16 x) in exact int32 VPDPBUSD sums, DSATTN_INT8_VNNI=0 keeps the widening kernels;
    bf16 x with per-channel or group_size % 16 == 0 scales: weight tiles dequantized into oneDNN's brgemm
    micro-kernel, on AMX CPUs from 8 rows, on AVX512-BF16 CPUs without AMX (Zen 4) from 64 (DSATTN_INT8_AMX=0
    turns it off); otherwise from 64 rows dequantized panels into torch's GEMM, bf16 for bf16 x). "auto": triton
    on CUDA, cpp on the CPU (where built), else torch; torch when a gradient (x or bias requiring grad) is wanted.
    """
    grad_enabled = torch.is_grad_enabled()
    shape = well_formed_shape(w)
    if shape is None or not _checks.matmul_call_ok(x, bias, *shape, w.qweight.device) \
            or grad_enabled and w.scales.requires_grad:
        _checks.check_tensor(OP, "x", x, dtypes=_checks.FLOAT_DTYPES)
        shape = check_int8_weight(OP, w)
        _checks.check_matmul_x_bias(OP, x, bias, *shape)
        _checks.check_same_device(OP, x=x, qweight=w.qweight, bias=bias)
        check_frozen(**{"w.scales": w.scales})
    qweight, scales, group_size = w.qweight, w.scales, w.group_size
    device = x.device
    _backend.check_no_forward_ad(x, bias)
    grad = grad_enabled and (x.requires_grad or bias is not None and bias.requires_grad)  # _backend.needs_grad
    chosen = select(OP, backend, device, x.dtype, grad, group_size, _auto_order(device.type))
    if not grad and chosen == "cpp" and _backend.plain_eager(x, qweight, scales, bias):
        # No gradient, no tracer or mode for the op's dispatch to serve: the op would only forward here. The
        # selection above recorded the backend (_backend.recording sees this call too).
        return _int8_matmul(x, qweight, scales, group_size, bias, chosen)
    return int8_matmul_op(x, qweight, scales, group_size, bias, chosen)
