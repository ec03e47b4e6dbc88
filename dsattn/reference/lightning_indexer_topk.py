"""DeepSeek-V3.2 lightning indexer + top-k, the oracle: the dense score matrix and an explicit visibility mask,
written for clarity (O(Sq x Hi x Sk) memory: tests only). The streaming code is the "torch" backend
(dsattn.torch_backend.lightning_indexer_topk).

score[b, i, j] = sum_h weights[b, i, h] * relu(scale * q_idx[b, i, h, :] . k_idx[b, j, :])

Query i sits at position p = i + Sk - Sq; with causal=True key j is visible iff j <= p. Each row lists the
indices of its top_k highest-scoring visible keys, highest first, then -1 where fewer keys are visible.
A key a row cannot see never takes part in its ranking.
"""

import torch


def visible_mask(seq_q: int, seq_k: int, causal: bool, device=None) -> torch.Tensor:
    """bool [Sq, Sk]: key j visible to query i."""
    position = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    key = torch.arange(seq_k, device=device)[None, :]
    return key <= position if causal else torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)


def indexer_scores(q_idx, k_idx, weights, scale: float, *, relu: bool = True) -> torch.Tensor:
    """[B, Sq, Hi, D], [B, Sk, D], [B, Sq, Hi] -> [B, Sq, Sk] in float32 (float64 for float64 q_idx)."""
    compute = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    per_head = torch.einsum("bihd,bjd->bihj", q_idx.to(compute), k_idx.to(compute)) * scale
    if relu:
        per_head = torch.relu(per_head)
    return (weights.to(compute)[..., None] * per_head).sum(dim=2)


def lightning_indexer_topk(q_idx, k_idx, weights, top_k: int, *, scale: float | None = None, causal: bool = True,
                           relu: bool = True) -> torch.Tensor:
    """q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi] -> int32 [B, Sq, top_k]. scale defaults
    to D ** -0.5. `relu=False` ranks the raw weighted dot products (topk_sparse_attention's selection)."""
    b, sq, _, d = q_idx.shape
    sk = k_idx.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.full((b, sq, top_k), -1, dtype=torch.int32, device=q_idx.device)
    n = min(top_k, sk)
    if sq == 0 or n == 0:
        return out
    visible = visible_mask(sq, sk, causal, q_idx.device).expand(b, sq, sk)
    scores = indexer_scores(q_idx, k_idx, weights, scale, relu=relu)
    scores = torch.where(visible, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    best = scores.topk(n, dim=-1).indices
    # Past a row's visible keys the top n holds invisible ones (ranked -inf): those slots are "no key".
    out[..., :n] = torch.where(visible.gather(-1, best), best, -1).to(torch.int32)
    return out
