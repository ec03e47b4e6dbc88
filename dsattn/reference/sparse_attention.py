"""Index-driven sparse attention in plain PyTorch (the oracle and the "torch" backend).

Each query row attends to exactly the keys its `indices` row lists (DeepSeek-V3.2 DSA): -1 means "no key";
with causal=True listed keys after the query's position (query i sits at i + Sk - Sq) are skipped; a
duplicated index counts once per listing (gather semantics); a row with no valid key outputs zeros.
The rows are processed in chunks of Sq so that memory is O(chunk x topk x D), never O(Sq x Sk).
"""

import torch

# Elements of gathered K plus V held per chunk (~64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], indices [B, Sq, T] or [B, Hkv, Sq, T]
    -> [B, Hq, Sq, Dv] in q's dtype. Computes in float32 (float64 for float64 inputs). Indices outside
    [0, Sk) are treated as "no key" (dsattn.sparse_attention rejects them before getting here)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    scale = dqk**-0.5 if scale is None else scale
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    topk = indices.shape[-1]
    indices = indices.expand(b, hkv, sq, topk)
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or topk == 0 or sk == 0:
        return out
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, b * hkv * topk * (dqk + dv)))
    for start in range(0, sq, chunk_size):
        stop = min(start + chunk_size, sq)
        rows = stop - start
        idx = indices[:, :, start:stop].long()  # [B, Hkv, c, T]
        valid = (idx >= 0) & (idx < sk)
        if causal:
            position = torch.arange(start, stop, device=q.device) + (sk - sq)
            valid &= idx <= position[:, None]
        flat = idx.clamp(0, sk - 1).reshape(b, hkv, rows * topk, 1)
        k_rows = torch.gather(k, 2, flat.expand(-1, -1, -1, dqk)).view(b, hkv, rows, topk, dqk).to(compute)
        v_rows = torch.gather(v, 2, flat.expand(-1, -1, -1, dv)).view(b, hkv, rows, topk, dv).to(compute)
        q_rows = q[:, :, start:stop].reshape(b, hkv, groups, rows, dqk).to(compute)
        scores = torch.einsum("bhgcd,bhctd->bhgct", q_rows, k_rows) * scale
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all-masked rows
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhgct,bhctv->bhgcv", probs, v_rows) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, :, start:stop] = o.reshape(b, hq, rows, dv).to(q.dtype)
    return out
