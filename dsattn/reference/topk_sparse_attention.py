"""Per-row top-k softmax attention, the oracle: dense scores, an explicit visibility mask and one top-k per row,
written for clarity (O(Sq x Sk x D) memory: tests only). The tuned chunked code is the "torch" backend
(dsattn.torch_backend.topk_sparse_attention).

Semantics (SPEC): each (query, head) keeps the top_k keys by score scale * q.k among the keys it can see
(causal: j <= i + Sk - Sq; query i sits at that position), then softmax attention over those only; fewer
visible keys than top_k: all of them (top_k >= Sk is dense attention); a row that sees no key outputs zeros.
Ties among equal scores are broken arbitrarily. Keys a row cannot see never enter its arithmetic, and keys it
does not select never enter its softmax or its sum of values (torch.where, not 0 * x). The selection is not
differentiated: gradients flow through the selected keys only.
"""

import torch


def selected_mask(scores: torch.Tensor, visible: torch.Tensor, top_k: int) -> torch.Tensor:
    """bool like scores [..., Sq, Sk]: the top_k visible keys of each row by score (all when fewer)."""
    ranked = torch.where(visible, scores.detach(), float("-inf"))
    chosen = ranked.topk(min(top_k, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(visible).scatter_(-1, chosen, True) & visible


def topk_sparse_attention(q, k, v, top_k: int, *, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype, computed
    in float32 (float64 for float64 inputs)."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.to(compute).repeat_interleave(hq // hkv, dim=1)[:, :, None]  # [B, Hq, 1, Sk, Dqk]
    v = v.to(compute).repeat_interleave(hq // hkv, dim=1)[:, :, None]
    position = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=q.device)[None, :]
    visible = (key <= position) if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    visible = visible.expand(*q.shape[:2], sq, sk)
    zero = torch.zeros((), dtype=compute, device=q.device)
    scores = (q.to(compute)[:, :, :, None, :] * torch.where(visible[..., None], k, zero)).sum(dim=-1) * scale
    chosen = selected_mask(scores, visible, top_k)
    scores = torch.where(chosen, scores, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.where(chosen, torch.exp(scores - row_max), zero)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    # Unselected values replaced before the product (a where after it would give 0 * NaN in the backward).
    return (weights[..., None] * torch.where(chosen[..., None], v, zero)).sum(dim=-2).to(q.dtype)
