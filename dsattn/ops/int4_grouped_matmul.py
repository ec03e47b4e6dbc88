"""int4_grouped_matmul: the custom op torch.ops.dsattn.int4_grouped_matmul and its functional entry
dsattn.int4_grouped_matmul: int4_matmul per MoE expert, every expert in one call.

The op is opaque to torch.compile (a custom_op with a fake kernel): its torch and cpp backends read the
routing back to the host (one bincount) to loop over the experts present; the Triton backend sorts the routing
on the device (no host sync, so a CUDA decode step stays capturable). Gradients: x and the routing weights
(the int4 weights are frozen), by the torch backend whichever backend ran the forward; the compiled and Triton
paths declare no backward, so with a gradient wanted "auto" takes the torch backend.
"""

from typing import Optional

import torch

from dsattn import _backend, _checks
from dsattn._library import define_op
from dsattn.ops.int4_matmul import check_frozen, select
from dsattn.quant.int4 import SCALE_DTYPES, check_group_size
from dsattn.torch_backend import int4_grouped_matmul as _torch

OP = "int4_grouped_matmul"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _cpp_expert_matmul(x_dtype):
    """The compiled CPU int4_matmul as the torch backend's per-expert GEMM. It is handed fp32 rows; for bf16 x
    they go back to bf16 (exactly: they came from bf16) so that the kernel's bf16 GEMM path runs."""
    def expert_matmul(x_rows, qweight, scales, zeros, group_size):
        if x_dtype == torch.bfloat16:
            x_rows = x_rows.to(torch.bfloat16)
        return torch.ops.dsattn_C.int4_matmul(x_rows, qweight.contiguous(), scales.float().contiguous(),
                                              zeros.contiguous(), group_size, None)

    return expert_matmul


def _int4_grouped_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, expert_ids: torch.Tensor, weights: Optional[torch.Tensor],
                         backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import int4_grouped_matmul as _triton

        slots = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
        out = _triton.int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids.reshape(-1), slots,
                                          None if weights is None else weights.reshape(-1))
        return out.reshape(*expert_ids.shape, qweight.shape[1])
    expert_matmul = _cpp_expert_matmul(x.dtype) if backend == "cpp" else None
    return _torch.int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, weights,
                                      expert_matmul=expert_matmul)


def _fake(x, qweight, scales, zeros, group_size, expert_ids, weights, backend):
    return x.new_empty(*expert_ids.shape, qweight.shape[1])


int4_grouped_matmul_op = define_op(OP, _int4_grouped_matmul, fake=_fake)


def _grouped_backward(grad_out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, group_size: int, expert_ids: torch.Tensor, weights: Optional[torch.Tensor],
                      need_x: bool, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dweights = _torch.int4_grouped_matmul_backward(grad_out, x, qweight, scales, zeros, group_size, expert_ids,
                                                       weights, need_x=need_x, need_weights=need_weights)
    # A custom op returns tensors: empty ones for the gradients not asked for.
    return (x.new_empty(0) if dx is None else dx,
            x.new_empty(0, dtype=torch.float32) if dweights is None else dweights)


def _grouped_backward_fake(grad_out, x, qweight, scales, zeros, group_size, expert_ids, weights, need_x,
                           need_weights):
    return (x.new_empty(x.shape if need_x else (0,)),
            weights.new_empty(weights.shape) if need_weights else x.new_empty(0, dtype=torch.float32))


# The backward is an op of its own, opaque like the forward, so that autograd's tracing (torch.compile) never
# reaches the host read of the routing.
int4_grouped_matmul_backward_op = define_op(OP + "_backward", _grouped_backward, fake=_grouped_backward_fake)


def _weight_grad_ste(grad_out: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor,
                     weights: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    return _torch.weight_grad_ste(grad_out, x, expert_ids, weights, num_experts)


def _weight_grad_ste_fake(grad_out, x, expert_ids, weights, num_experts):
    from dsattn.torch_backend.int4_matmul import compute_dtype

    return x.new_empty(num_experts, grad_out.shape[-1], x.shape[1], dtype=compute_dtype(x.dtype))


# Quantization-aware training (dsattn.nn.Int4Experts(train_mode=True)): the latent float expert weights'
# straight-through gradient [E, N, K] (compute dtype); opaque like the backward (it reads the routing back).
int4_grouped_matmul_weight_grad_ste_op = define_op(OP + "_weight_grad_ste", _weight_grad_ste,
                                                   fake=_weight_grad_ste_fake)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, expert_ids, weights, backend = inputs
    ctx.save_for_backward(x, qweight, scales, zeros, expert_ids, weights)
    ctx.group_size, ctx.backend = group_size, backend


def _backward(ctx, grad_out):
    x, qweight, scales, zeros, expert_ids, weights = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[6] and weights is not None
    dx, dweights = int4_grouped_matmul_backward_op(grad_out, x, qweight, scales, zeros, ctx.group_size,
                                                   expert_ids, weights, need_x, need_weights)
    return (dx if need_x else None), None, None, None, None, None, (dweights if need_weights else None), None


int4_grouped_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, weights=None, *, backend="auto"):
    """MoE experts' int4 GEMM: row m of x [M, K] goes through the experts expert_ids[m, s] (int32/int64
    [M, S], or [M] for one each) of the stacked weights qweight int32 [E, N, K/8], scales [E, N, K/g], zeros
    uint8 [E, N, K/g] (dsattn.quant.int4's layout per expert):
    out[m, s] = x[m] @ dequantize(W[expert_ids[m, s]]).T (* weights[m, s]), shape [*expert_ids.shape, N] in
    x's dtype. Ids outside [0, E) (transformers' dropped slots carry E) give zero rows. weights (float, shaped
    like expert_ids) are applied in fp32 before the one rounding (MoE routing weights).

    Backends: "triton" (all experts in one launch, routing sorted on the device: no host sync; fp16/bf16 x,
    fp32 x as tf32x3; group_size % 16 == 0), "cpp" (CPU: the compiled int4_matmul per expert present),
    "torch" (per expert; the only one for float64 and the one with a backward: x and weights). auto: triton
    on CUDA, cpp on CPU, torch when a gradient is wanted."""
    op = OP
    _checks.check_tensor(op, "x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(op, "qweight", qweight, ndim=3, dtypes=(torch.int32,))
    _checks.check_tensor(op, "scales", scales, ndim=3, dtypes=SCALE_DTYPES)
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
    check_frozen(op, scales=scales)
    chosen = select(op, backend, x.device, x.dtype, _backend.needs_grad(x, weights), group_size,
                    AUTO_ORDER.get(x.device.type))
    return int4_grouped_matmul_op(x, qweight, scales, zeros, group_size, expert_ids, weights, chosen)
