"""Keys a query row cannot see never enter its arithmetic, in the chunked torch backends: one mechanism, the
same eager and traced (torch.compile, fake tensors, CUDA graphs), with no host read of the data.

The backends score a chunk of query rows against a span of keys with one matmul and mask per (row, key)
afterwards. A masked score is replaced, so a NaN / Inf key row leaves the forward's scores of the rows that
cannot see it; but the product with V, and in the backward dQ = dS K and dP = dO V^T, run over every key of the
span, so 0 x NaN (or Inf) of a key hidden from a row would reach that row. So V, and K in the backward, enter
the matmuls with their NaN / Inf entries zeroed (finite), and a row that sees (by the backend's own
visibility: window, listing, selection) a key or value row that held one is NaN (nan_rows: the output, and
in the backward dq, start from it; the rows' results are added to it). The oracle makes such a row
non-finite too (NaN or +-Inf in the columns the values reach; the backends give NaN in the whole row). Every
other row's output, and every gradient it reaches, is the one of the clean inputs. Per call that is one
matrix-vector product per K and V (bad_rows), one elementwise pass per K / V (finite) and O(rows) work to
count the bad keys each row sees.
"""

import torch

# A finite row's dot product with this weight stays far from overflow (|x| < 2^128 in float32: D x 2^28).
_TINY = 2.0**-100


def bad_rows(t: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """bool [..., N]: the rows of t [..., N, D] holding a NaN or Inf (their dot product with 2^-100 is not
    finite, a finite row's is), by one matrix-vector product in the compute dtype."""
    t = t.to(compute)
    return ~torch.isfinite(torch.mv(t.reshape(-1, t.shape[-1]), t.new_full((t.shape[-1],), _TINY)).view(t.shape[:-1]))


def finite(t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """t with its NaN / Inf entries zeroed (no gradient reaches them); inplace: t may be overwritten."""
    return t.nan_to_num_(0.0, 0.0, 0.0) if inplace else t.nan_to_num(0.0, 0.0, 0.0)


def range_counts(bad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int64 [B, Hkv, R]: how many of the keys [lo[r], hi[r]) (int64 [R], within [0, N]) are bad (bool
    [B, Hkv, N]), by a prefix sum."""
    prefix = torch.nn.functional.pad(bad.long().cumsum(-1), (1, 0))
    return prefix[..., hi] - prefix[..., lo]


def nan_rows(counts: torch.Tensor, groups: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv x groups, R, dim] in dtype: NaN in the rows where counts [B, Hkv, R] (the bad keys each row
    sees; the same for the q heads of a kv head) is not zero, 0 elsewhere. A backend's output, and dq, start
    from it and add the rows' results (instead of starting from zeros: no extra pass)."""
    b, hkv, rows = counts.shape
    rows_nan = torch.where(counts != 0, float("nan"), 0.0).to(dtype)
    rows_nan = rows_nan[:, :, None, :, None].expand(b, hkv, groups, rows, dim)
    return rows_nan.reshape(b, hkv * groups, rows, dim).contiguous()
