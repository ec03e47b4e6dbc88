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
