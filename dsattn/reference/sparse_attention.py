"""Index-driven sparse attention, the oracle: dense listing counts and an explicit per-row mask, written for
clarity (O(Sq x Sk x D) memory: tests only). The tuned chunked code is the "torch" backend
(dsattn.torch_backend.sparse_attention).

Semantics (SPEC): each query row attends to exactly the keys its `indices` row lists (DeepSeek-V3.2 DSA);
-1 (and any entry outside [0, Sk)) means "no key"; with causal=True listed keys after the query's position
(query i sits at i + Sk - Sq) are skipped; a key listed n times counts n times (gather semantics: its
exp(score) is weighted by n); a row with no valid key outputs zeros. Keys a row does not list never enter
its arithmetic (torch.where, not 0 * x), so a NaN or Inf there stays out, forward and backward.
"""

import torch


def listing_counts(indices, heads_q: int, seq_k: int, causal: bool) -> torch.Tensor:
    """[B, Hq, Sq, Sk]: how often each query row validly lists each key (0: not attended)."""
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    b, hkv, sq, _ = indices.shape
    idx = indices.long().repeat_interleave(heads_q // hkv, dim=1)  # shared lists: hkv = 1 here
    key = torch.arange(seq_k, device=indices.device)
    listed = idx[..., None] == key  # [B, Hq, Sq, T, Sk]; -1 and out-of-range entries match no key
    if causal:
        position = torch.arange(sq, device=indices.device) + (seq_k - sq)
        listed = listed & (key <= position[:, None])[:, None, :]
    return listed.sum(dim=-2)


def sparse_attention(q, k, v, indices, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], indices [B, Sq, T] or [B, Hkv, Sq, T]
    -> [B, Hq, Sq, Dv] in q's dtype, computed in float32 (float64 for float64 inputs)."""
    hq, hkv, sk = q.shape[1], k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.to(compute).repeat_interleave(hq // hkv, dim=1)[:, :, None]  # [B, Hq, 1, Sk, Dqk]
    v = v.to(compute).repeat_interleave(hq // hkv, dim=1)[:, :, None]
    counts = listing_counts(indices, hq, sk, causal).to(compute)  # [B, Hq, Sq, Sk]
    listed = counts > 0
    zero = torch.zeros((), dtype=compute, device=q.device)
    # Scores against listed keys only: an unlisted key's k is replaced before it meets q.
    k_seen = torch.where(listed[..., None], k, zero)
    scores = (q.to(compute)[:, :, :, None, :] * k_seen).sum(dim=-1) * scale
    scores = torch.where(listed, scores, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.where(listed, counts * torch.exp(scores - row_max), zero)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    # Unlisted values replaced before the product (a where after it would give 0 * NaN in the backward).
    v_seen = torch.where(listed[..., None], v, zero)
    return (weights[..., None] * v_seen).sum(dim=-2).to(q.dtype)
