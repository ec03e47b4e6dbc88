"""int4_matmul in chunked PyTorch (the "torch" backend): x @ dequantize(W).T (+ bias), dequantizing
ROWS_PER_CHUNK output rows of the weight at a time, never the whole [N, K] weight; and its backward
dx = grad @ dequantize(W) by the same chunks (the int4 weight is frozen: no gradient for it). For
quantization-aware training (dsattn.nn.Int4Linear(train_mode=True)) the latent float weight's
straight-through gradient, weight_grad_ste.

Layout (dsattn.reference.int4): qweight int32 [N, K/8], element (n, 8j + i) in bits [4i, 4i+4) of
qweight[n, j]; scales [N, K/g], zeros uint8 [N, K/g]; w = (q - zero) * scale; with AWQ scaling, x is multiplied
by input_scale [K] first. Accumulates in float32 (float64 for float64 x), one rounding to x's dtype.
"""

import torch

# Output rows of the weight dequantized at once: a [ROWS_PER_CHUNK, K] fp32 block (16 MiB at K = 4096).
ROWS_PER_CHUNK = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize_rows(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, K] in dtype from the packed rows qweight [rows, K/8] (no input_scale)."""
    rows, words = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight.unsqueeze(-1) >> shifts) & 0xF).to(dtype)  # [rows, K/8, 8]; the mask drops the sign bits
    q = q.view(rows, words * 8 // group_size, group_size)  # [rows, groups, g]
    w = (q - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return w.view(rows, words * 8)


def _row_chunks(n: int, rows_per_chunk: int | None):
    step = rows_per_chunk or ROWS_PER_CHUNK
    for start in range(0, n, step):
        yield start, min(start + step, n)


def int4_matmul(x, qweight, scales, zeros, group_size: int, input_scale=None, bias=None, *,
                rows_per_chunk: int | None = None):
    """x [..., K] -> [..., N] in x's dtype."""
    compute = compute_dtype(x.dtype)
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k).to(compute)
    if input_scale is not None:
        x2 = x2 * input_scale.to(compute)
    if n <= (rows_per_chunk or ROWS_PER_CHUNK):  # one chunk: the GEMM's output is the result
        out = x2 @ dequantize_rows(qweight, scales, zeros, group_size, compute).T
    else:
        out = torch.empty(x2.shape[0], n, dtype=compute, device=x.device)
        for start, stop in _row_chunks(n, rows_per_chunk):
            w = dequantize_rows(qweight[start:stop], scales[start:stop], zeros[start:stop], group_size, compute)
            out[:, start:stop] = x2 @ w.T
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int4_matmul_backward_x(grad_out, qweight, scales, zeros, group_size: int, input_scale=None, *, x_dtype,
                           rows_per_chunk: int | None = None):
    """dx [..., K] in x_dtype from grad_out [..., N]: sum over chunks of grad[:, chunk] @ dequantize(chunk)
    (times input_scale, which multiplied x in the forward)."""
    compute = compute_dtype(x_dtype)
    n, k = qweight.shape[0], qweight.shape[1] * 8
    g = grad_out.reshape(-1, n).to(compute)
    dx = torch.zeros(g.shape[0], k, dtype=compute, device=grad_out.device)
    for start, stop in _row_chunks(n, rows_per_chunk):
        w = dequantize_rows(qweight[start:stop], scales[start:stop], zeros[start:stop], group_size, compute)
        dx.addmm_(g[:, start:stop], w)
    if input_scale is not None:
        dx.mul_(input_scale.to(compute))
    return dx.to(x_dtype).reshape(*grad_out.shape[:-1], k)


def bias_backward(grad_out, bias_dtype: torch.dtype):
    """dbias [N]: grad_out summed over every leading dim, accumulated in fp32 (fp64 for fp64)."""
    n = grad_out.shape[-1]
    return grad_out.reshape(-1, n).to(compute_dtype(bias_dtype)).sum(0).to(bias_dtype)


def weight_grad_ste(grad_out, x, weight_dtype: torch.dtype):
    """The straight-through estimate of the latent float weight's gradient [N, K] in weight_dtype:
    grad_out^T @ x over every leading dim (the rounding to int4 is treated as the identity), accumulated in
    fp32 (fp64 for fp64)."""
    compute = torch.float64 if torch.float64 in (x.dtype, weight_dtype) else torch.float32
    n, k = grad_out.shape[-1], x.shape[-1]
    return (grad_out.reshape(-1, n).to(compute).T @ x.reshape(-1, k).to(compute)).to(weight_dtype)
