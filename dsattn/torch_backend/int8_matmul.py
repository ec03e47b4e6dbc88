"""int8_matmul in chunked PyTorch (the "torch" backend): x @ dequantize(W).T (+ bias), dequantizing
ROWS_PER_CHUNK output rows of the weight at a time (the row chunks of the int4 backend), never the whole
[N, K] weight; and its backward dx = grad @ dequantize(W) by the same chunks (the int8 weight is frozen).

Layout (dsattn.quant.int8): qweight int8 [N, K]; scales [N] (per output channel) or [N, K/g]; w = q * scale.
Per-channel weights are not dequantized at all: x @ q.T then a scale per output column (exact in the compute
dtype, q being small integers). Accumulates in float32 (float64 for float64 x), one rounding to x's dtype.

On the CPU, fp16/bf16 x with per-channel scales in x's dtype goes to torch's own int8 weight-only GEMM
(torch._weight_int8pack_mm: int8 weight read as is, fp32 accumulation, one rounding to x's dtype), several
times faster than widening the weight; it has no fp32 fast path (slower than the chunks there).
"""

import torch

from dsattn.torch_backend.int4_matmul import _row_chunks, compute_dtype

# Output rows of the weight dequantized at once: a [ROWS_PER_CHUNK, K] fp32 block (16 MiB at K = 4096).
ROWS_PER_CHUNK = 1024

_INT8PACK_DTYPES = (torch.float16, torch.bfloat16)


def dequantize_rows(qweight, scales, group_size, dtype: torch.dtype) -> torch.Tensor:
    """[rows, K] in dtype from qweight rows [rows, K] and their scales ([rows] or [rows, K/g])."""
    rows, k = qweight.shape
    q = qweight.to(dtype)
    if group_size is None:
        return q * scales.to(dtype)[:, None]
    return (q.view(rows, k // group_size, group_size) * scales.to(dtype)[..., None]).view(rows, k)


def _chunk_product(x2, qweight, scales, group_size, compute):
    """x2 [M, K] @ dequantize(rows).T in compute for one row chunk."""
    if group_size is None:  # scale the output columns instead of the weight
        return (x2 @ qweight.to(compute).T) * scales.to(compute)
    return x2 @ dequantize_rows(qweight, scales, group_size, compute).T


def use_int8pack(x, scales, group_size) -> bool:
    """Whether torch._weight_int8pack_mm computes this call (see the module docstring)."""
    return (x.device.type == "cpu" and group_size is None and x.dtype in _INT8PACK_DTYPES
            and scales.dtype == x.dtype and hasattr(torch, "_weight_int8pack_mm"))


def int8_matmul(x, qweight, scales, group_size, bias=None, *, rows_per_chunk: int | None = None):
    """x [..., K] -> [..., N] in x's dtype."""
    n, k = qweight.shape[0], x.shape[-1]
    if use_int8pack(x, scales, group_size) and rows_per_chunk is None:
        out = torch._weight_int8pack_mm(x.reshape(-1, k).contiguous(), qweight.contiguous(), scales)
        if bias is not None:
            out = (out.float() + bias.float()).to(x.dtype)
        return out.reshape(*x.shape[:-1], n)
    compute = compute_dtype(x.dtype)
    x2 = x.reshape(-1, k).to(compute)
    if n <= (rows_per_chunk or ROWS_PER_CHUNK):  # one chunk: the GEMM's output is the result
        out = _chunk_product(x2, qweight, scales, group_size, compute)
    else:
        out = torch.empty(x2.shape[0], n, dtype=compute, device=x.device)
        for start, stop in _row_chunks(n, rows_per_chunk or ROWS_PER_CHUNK):
            out[:, start:stop] = _chunk_product(x2, qweight[start:stop], scales[start:stop], group_size, compute)
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int8_matmul_backward_x(grad_out, qweight, scales, group_size, *, x_dtype, rows_per_chunk: int | None = None):
    """dx [..., K] in x_dtype from grad_out [..., N]: sum over row chunks of grad[:, chunk] @ dequantize(chunk)."""
    compute = compute_dtype(x_dtype)
    n, k = qweight.shape
    g = grad_out.reshape(-1, n).to(compute)
    dx = torch.zeros(g.shape[0], k, dtype=compute, device=grad_out.device)
    for start, stop in _row_chunks(n, rows_per_chunk or ROWS_PER_CHUNK):
        if group_size is None:  # fold the per-channel scale into the gradient's columns
            dx.addmm_(g[:, start:stop] * scales[start:stop].to(compute), qweight[start:stop].to(compute))
        else:
            dx.addmm_(g[:, start:stop], dequantize_rows(qweight[start:stop], scales[start:stop], group_size, compute))
    return dx.to(x_dtype).reshape(*grad_out.shape[:-1], k)
