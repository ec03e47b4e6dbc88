"""Plain-PyTorch int4 packing primitives (the layout every int4 kernel shares).

Layout: qweight int32 [N, K/8]; element (n, 8*j + i) sits in bits [4i, 4i+4) of qweight[n, j].
"""

import torch

NIBBLES_PER_WORD = 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8/int [N, K] with values 0..15 (K % 8 == 0) -> int32 [N, K/8]."""
    n, k = q.shape
    nib = q.to(torch.int64).reshape(n, k // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    shifts = torch.arange(0, 4 * NIBBLES_PER_WORD, 4, device=q.device, dtype=torch.int64)
    words = (nib << shifts).sum(-1)  # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] -> uint8 [N, K] with values 0..15."""
    shifts = torch.arange(0, 4 * NIBBLES_PER_WORD, 4, device=qweight.device, dtype=torch.int32)
    nib = (qweight.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign bits
    return nib.reshape(qweight.shape[0], -1).to(torch.uint8)


def dequantize_int4(qweight, scales, zeros, group_size, input_scale=None, dtype=None) -> torch.Tensor:
    """[N, K] weight from the packed form: w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g],
    divided by input_scale[k] when AWQ-style activation scaling was used."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int4(qweight).to(compute)
    z = zeros.to(compute).repeat_interleave(group_size, dim=1)
    s = scales.to(compute).repeat_interleave(group_size, dim=1)
    w = (q - z) * s
    if input_scale is not None:
        w = w * input_scale.to(compute)[None, :]
    return w.to(dtype or scales.dtype)


def int4_matmul(x, qweight, scales, zeros, group_size, input_scale=None, bias=None, *, rows_per_chunk=1024):
    """x [..., K] @ dequantize().T (+ bias), dequantizing rows_per_chunk output rows at a time (never the
    whole weight): the "torch" backend. Accumulates in float32 (float64 for float64 x)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = qweight.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).to(compute)
    if input_scale is not None:
        x2 = x2 * input_scale.to(compute)
    out = torch.empty(x2.shape[0], n, dtype=compute, device=x.device)
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        w = dequantize_int4(qweight[start:stop], scales[start:stop], zeros[start:stop], group_size, dtype=compute)
        out[:, start:stop] = x2 @ w.T
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, slots=1, weights=None, *,
                        expert_matmul=None):
    """The "torch" backend of dsattn.int4_grouped_matmul, one expert at a time: pair p of the flattened
    expert_ids [P] reads x row p // slots, out[p] = x[p // slots] @ dequantize(W[expert_ids[p]]).T
    (* weights[p]) for qweight [E, N, K/8], scales / zeros [E, N, K/g]; ids outside [0, E) give zero rows.
    Accumulates in float32 (float64 for float64 x) and rounds once to x's dtype. expert_matmul(x_rows,
    qweight, scales, zeros, group_size) -> [rows, N] in x_rows' dtype is the per-expert GEMM (default: this
    module's int4_matmul; the "cpp" backend passes the compiled CPU kernel). Reads the routing back to the
    host (one sort), so it is for CPU tensors and tests."""
    expert_matmul = expert_matmul or int4_matmul
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_experts, n = qweight.shape[0], qweight.shape[1]
    ids = expert_ids.reshape(-1).to(torch.int64)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # num_experts: dropped
    out = torch.zeros(ids.numel(), n, dtype=compute, device=x.device)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts].tolist()
    x_c = x.to(compute)
    start = 0
    for expert, count in enumerate(counts):
        pairs = order[start:start + count]
        start += count
        if count == 0:
            continue
        y = expert_matmul(x_c[pairs // slots], qweight[expert], scales[expert], zeros[expert], group_size)
        if weights is not None:
            y = y * weights.reshape(-1)[pairs, None].to(compute)
        out[pairs] = y.to(compute)
    return out.to(x.dtype)
