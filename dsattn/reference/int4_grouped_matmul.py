"""Oracle of dsattn.int4_grouped_matmul: every expert's dequantized weight applied to every row, each pair
keeping its own expert's result (for clarity: E times the work, no routing to get wrong)."""

import torch

from dsattn.reference.int4 import dequantize_int4


def int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, weights=None):
    """x [M, K], stacked qweight [E, N, K/8], scales / zeros [E, N, K/g], expert_ids [M] or [M, slots] ->
    [*expert_ids.shape, N] in x's dtype: out[m, s] = x[m] @ dequantize(W[expert_ids[m, s]]).T
    (* weights[m, s]); ids outside [0, E) give zero rows."""
    num_experts, n = qweight.shape[0], qweight.shape[1]
    ids = expert_ids.reshape(x.shape[0], -1)  # [M, slots]
    out = torch.zeros(*ids.shape, n, dtype=x.dtype, device=x.device)
    for e in range(num_experts):
        y = x @ dequantize_int4(qweight[e], scales[e], zeros[e], group_size, dtype=x.dtype).T  # [M, N]
        out = torch.where((ids == e)[..., None], y[:, None, :], out)
    if weights is not None:
        out = out * weights.reshape(ids.shape)[..., None].to(x.dtype)
    return out.reshape(*expert_ids.shape, n)
