"""The int4 format, plainly: packing, unpacking (the oracle of the internal int4_unpack op) and dequantization,
the layout every int4 kernel shares. Oracles of the matmuls: dsattn.reference.int4_matmul and
dsattn.reference.int4_grouped_matmul.

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
