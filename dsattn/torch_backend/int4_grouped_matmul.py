"""int4_grouped_matmul one expert at a time (the "torch" backend, and the "cpp" backend with the compiled
int4_matmul as the per-expert GEMM), and its backward (dx and the routing weights' gradient; the int4 weights
are frozen). For quantization-aware training (dsattn.nn.Int4Experts(train_mode=True)) the latent float expert
weights' straight-through gradient, weight_grad_ste.

Pair p of the flattened expert_ids [P] reads x row p // slots: out[p] = x[p // slots] @ dequantize(W[e]).T
(* weights[p]) with e = expert_ids[p], for qweight [E, N, K/8], scales / zeros [E, N, K/g]; ids outside
[0, E) give zero rows. Accumulates in float32 (float64 for float64 x) and rounds once to x's dtype. The
routing is read back to the host (one bincount), so this is for CPU tensors and tests; the Triton kernel sorts
it on the device.
"""

import torch

from dsattn.torch_backend import int4_matmul as _dense


def _experts(expert_ids: torch.Tensor, num_experts: int):
    """(expert, pair ids) for every expert that serves at least one pair, pair ids in ascending order."""
    ids = expert_ids.reshape(-1).to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # num_experts: dropped
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts].tolist()  # the host read
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, order[start:start + count]
        start += count


def _torch_expert_matmul(x_rows, qweight, scales, zeros, group_size):
    return _dense.int4_matmul(x_rows, qweight, scales, zeros, group_size)


def int4_grouped_matmul(x, qweight, scales, zeros, group_size: int, expert_ids, weights=None, *,
                        expert_matmul=None):
    """x [M, K], expert_ids [M] or [M, slots] -> [*expert_ids.shape, N] in x's dtype. expert_matmul(x_rows,
    qweight, scales, zeros, group_size) -> [rows, N] is the per-expert GEMM (default: the chunked torch one;
    the "cpp" backend passes the compiled kernel); it gets rows in the compute dtype."""
    expert_matmul = expert_matmul or _torch_expert_matmul
    compute = _dense.compute_dtype(x.dtype)
    num_experts, n = qweight.shape[0], qweight.shape[1]
    slots = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    out = torch.zeros(expert_ids.numel(), n, dtype=compute, device=x.device)
    flat_weights = None if weights is None else weights.reshape(-1)
    x_c = x.to(compute)
    for expert, pairs in _experts(expert_ids, num_experts):
        y = expert_matmul(x_c[pairs // slots], qweight[expert], scales[expert], zeros[expert], group_size)
        y = y.to(compute)
        if flat_weights is not None:
            y = y * flat_weights[pairs, None].to(compute)
        out[pairs] = y
    return out.to(x.dtype).reshape(*expert_ids.shape, n)


def int4_grouped_matmul_backward(grad_out, x, qweight, scales, zeros, group_size: int, expert_ids, weights=None,
                                 *, need_x: bool = True, need_weights: bool = False):
    """(dx [M, K] in x's dtype or None, dweights shaped like expert_ids in weights' dtype or None).

    dx[m] = sum over m's pairs p of (grad[p] * weights[p]) @ dequantize(W[e_p]), by the dense backend's
    chunks; dweights[p] = grad[p] . (x[m] @ dequantize(W[e_p]).T), the unweighted output recomputed per
    expert. Dropped pairs get zero gradients."""
    compute = _dense.compute_dtype(x.dtype)
    num_experts, n = qweight.shape[0], qweight.shape[1]
    slots = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    g = grad_out.reshape(-1, n).to(compute)
    flat_weights = None if weights is None else weights.reshape(-1).to(compute)
    dx = torch.zeros(x.shape, dtype=compute, device=x.device) if need_x else None
    dweights = torch.zeros(g.shape[0], dtype=compute, device=x.device) if need_weights else None
    for expert, pairs in _experts(expert_ids, num_experts):
        rows = pairs // slots
        g_e = g[pairs]
        w_e = (qweight[expert], scales[expert], zeros[expert], group_size)
        if need_x:
            g_x = g_e if flat_weights is None else g_e * flat_weights[pairs, None]
            dx.index_add_(0, rows, _dense.int4_matmul_backward_x(g_x, *w_e, x_dtype=compute))
        if need_weights:
            y = _dense.int4_matmul(x[rows].to(compute), *w_e)
            dweights[pairs] = (g_e * y).sum(-1)
    return (None if dx is None else dx.to(x.dtype),
            None if dweights is None else dweights.to(weights.dtype).reshape(expert_ids.shape))


def weight_grad_ste(grad_out, x, expert_ids, weights, num_experts: int):
    """The straight-through estimate of the latent float expert weights' gradient [E, N, K] in the compute
    dtype (fp32, fp64 for fp64 x): dW[e] = sum over the pairs p routed to e of (grad[p] * weights[p])^T @
    x[p // slots], one GEMM per expert present; experts no pair reached and dropped pairs contribute zeros."""
    compute = _dense.compute_dtype(x.dtype)
    n, k = grad_out.shape[-1], x.shape[1]
    slots = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    g = grad_out.reshape(-1, n).to(compute)
    flat_weights = None if weights is None else weights.reshape(-1).to(compute)
    dw = torch.zeros(num_experts, n, k, dtype=compute, device=x.device)
    for expert, pairs in _experts(expert_ids, num_experts):
        g_e = g[pairs] if flat_weights is None else g[pairs] * flat_weights[pairs, None]
        torch.mm(g_e.T, x[pairs // slots].to(compute), out=dw[expert])
    return dw
