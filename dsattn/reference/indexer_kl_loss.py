"""DeepSeek-V3.2's indexer training objective, the oracle: dense [B, Sq, Sk] score matrices and explicit masks,
written for clarity (O(H x Sq x Sk) memory: tests only). The streaming code is the "torch" backend
(dsattn.torch_backend.indexer_kl_loss).

Index scores  I[b, i, j] = sum_h weights[b, i, h] * relu(index_scale * q_idx[b, i, h, :] . k_idx[b, j, :])
Target        p[b, i, :] = mean over the H heads of softmax_j(scale * q[b, h, i, :] . k[b, h_kv(h), j, :])
Loss          mean over the rows (b, i) that see at least one key of KL(p_i || softmax_j(I_i)); 0 when none does.

Both softmaxes run over the keys row i sees: with causal=True keys j <= i + Sk - Sq (query i sits at that
position), else every key; with `indices` [B, Sq, topk] (-1 = no key) only the listed ones among those,
each counted once however often it is listed. The target is a constant: gradients reach q_idx, k_idx and
weights only.
"""

import torch

from dsattn.reference.lightning_indexer_topk import indexer_scores, visible_mask


def key_mask(indices, batch: int, seq_q: int, seq_k: int, causal: bool, device=None) -> torch.Tensor:
    """bool [B, Sq, Sk]: key j takes part in row i's distributions."""
    mask = visible_mask(seq_q, seq_k, causal, device).expand(batch, seq_q, seq_k)
    if indices is None:
        return mask
    idx = indices.long()
    valid = (idx >= 0) & (idx < seq_k)
    listed = torch.zeros(batch, seq_q, seq_k + 1, dtype=torch.bool, device=device)
    listed.scatter_(-1, torch.where(valid, idx, seq_k), True)  # column Sk collects the "no key" entries
    return mask & listed[..., :seq_k]


def indexer_kl_loss(q_idx, k_idx, weights, q, k, *, indices=None, scale: float | None = None,
                    index_scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """q_idx [B, Sq, Hi, Di], k_idx [B, Sk, Di], weights [B, Sq, Hi], q [B, H, Sq, Dqk], k [B, Hkv, Sk, Dqk]
    (H % Hkv == 0), indices None or [B, Sq, topk]. A scalar in float32 (float64 for float64 q_idx)."""
    b, sq, _, di = q_idx.shape
    h, dqk = q.shape[1], q.shape[3]
    sk = k_idx.shape[1]
    scale = dqk**-0.5 if scale is None else scale
    index_scale = di**-0.5 if index_scale is None else index_scale
    compute = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    mask = key_mask(indices, b, sq, sk, causal, q_idx.device)
    seen = mask.any(dim=-1)  # [B, Sq]: rows that see a key

    with torch.no_grad():  # the target
        kk = k.to(compute).repeat_interleave(h // k.shape[1], dim=1)
        s = torch.einsum("bhid,bhjd->bhij", q.to(compute), kk) * scale
        s = s.masked_fill(~mask[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).mean(dim=1)  # [B, Sq, Sk]; empty rows give NaN -> 0

    scores = indexer_scores(q_idx, k_idx, weights, index_scale).to(compute)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~seen[..., None], 0.0)
    log_r = torch.log_softmax(scores, dim=-1)
    kl = torch.where(mask, torch.xlogy(p, p) - p * torch.where(mask, log_r, 0.0), 0.0).sum(dim=-1)
    return kl.sum() / seen.sum().clamp(min=1)
