"""Keys a query row cannot see never enter its arithmetic, in the chunked torch backends.

The backends score a chunk of query rows against a span of keys with one matmul and mask per (row, key)
afterwards. A masked score is replaced (masked_fill), but the product with V, and in the backward dQ = dS K and
dP = dO V^T, runs over every key of the span: 0 x NaN (or Inf) of a key hidden from a row would reach that row.
So key rows whose K or V hold a non-finite value (found by one reduction per call; finite inputs, the usual
case, keep the plain matmuls) are zeroed in the matmuls and handled per (row, key) by torch.where before their
products, as the oracles do: a row that cannot see them gets nothing from them, forward and backward, and a
row that can sees their values. The check reads the device once per call, so it runs eagerly only: traced
(torch.compile, fake tensors, CUDA graph capture) the backends keep the plain matmuls.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

# Elements of the per-(row, key) tensors built for the non-finite key rows, per piece.
PIECE_ELEMENTS = 1 << 22


def nonfinite_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """bool [B, Hkv, Sk]: the key rows of k [B, Hkv, Sk, Dqk] / v [B, Hkv, Sk, Dv] holding a NaN or Inf (a row
    whose sum overflows counts too: that only costs speed), or None when there is none (one host read)."""
    if k.numel() == 0 or v.numel() == 0 or _tracing(k):
        return None
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    bad = ~(torch.isfinite(k.sum(-1, dtype=acc)) & torch.isfinite(v.sum(-1, dtype=acc)))
    return bad if bool(bad.any()) else None


def _tracing(t: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() or is_fake(t) or t.device.type == "meta"
            or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def span_columns(bad: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Positions within keys [lo, hi) of the non-finite key rows (of any batch or head), or None."""
    if bad is None:
        return None
    cols = bad[:, :, lo:hi].any(1).any(0).nonzero().squeeze(1)
    return cols if cols.numel() else None


def _pieces(cols: torch.Tensor, per_col: int):
    step = max(1, PIECE_ELEMENTS // max(1, per_col))
    for i in range(0, cols.numel(), step):
        yield cols[i:i + step]


def scores(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, G, R, Dqk] . k [B, Hkv, N, Dqk] -> unscaled scores [B, Hkv, G, R, N]; the key rows `cols` count
    as zero where `visible` (bool, broadcastable to the scores) is False."""
    out = torch.einsum("bhgrd,bhnd->bhgrn", q, k.index_fill(2, cols, 0))
    for piece in _pieces(cols, q[..., 0].numel() * q.shape[-1]):
        k_rows = k.index_select(2, piece)[:, :, None, None]  # [B, Hkv, 1, 1, n, Dqk]
        seen = visible.index_select(-1, piece)[..., None]
        out = out.index_copy(-1, piece, (q[..., None, :] * torch.where(seen, k_rows, 0)).sum(-1))
    return out


def values(p: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """p [B, Hkv, G, R, N] @ v [B, Hkv, N, Dv] -> [B, Hkv, G, R, Dv]; the value rows `cols` count as zero where
    `visible` (bool, broadcastable to p) is False."""
    out = torch.einsum("bhgrn,bhnd->bhgrd", p, v.index_fill(2, cols, 0))
    for piece in _pieces(cols, p[..., 0].numel() * v.shape[-1]):
        v_rows = v.index_select(2, piece)[:, :, None, None]  # [B, Hkv, 1, 1, n, Dv]
        seen = visible.index_select(-1, piece)[..., None]
        out = out + (p.index_select(-1, piece)[..., None] * torch.where(seen, v_rows, 0)).sum(-2)
    return out
