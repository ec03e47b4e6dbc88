"""Per-row top-k softmax attention in plain PyTorch: each (query, head) attends to its top_k keys by q.k.

Built from the two DSA pieces: the indexer's streaming top-k (one head, unit weight, no relu) per query head
selects the keys, and sparse attention over those indices computes the output. No [Sq, Sk] tensor is held
beyond one streaming chunk.
"""

import torch

from dsattn.reference.lightning_indexer import lightning_indexer_topk
from dsattn.reference.sparse_attention import sparse_attention


def topk_indices(q, k, top_k, *, causal=True):
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> int32 [B, Hq, Sq, top_k] (per query head; -1 padded)."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    ones = torch.ones(b, sq, 1, dtype=q.dtype, device=q.device)
    per_head = [
        lightning_indexer_topk(q[:, h, :, None, :], k[:, h // groups], ones, top_k, scale=1.0, causal=causal,
                               relu=False)
        for h in range(hq)
    ]
    return torch.stack(per_head, dim=1)


def per_query_head(t, heads_q):
    """[B, Hkv, S, D] -> [B, Hq, S, D]: one "kv head" per query head, since selection is per query head
    (a view without GQA; with GQA groups > 1 this copies K/V once)."""
    b, hkv = t.shape[:2]
    if hkv == heads_q:
        return t
    return t[:, :, None].expand(b, hkv, heads_q // hkv, *t.shape[2:]).reshape(b, heads_q, *t.shape[2:])


def topk_sparse_attention(q, k, v, top_k, *, causal=True, scale=None, sparse_attention=sparse_attention):
    """Reference; `sparse_attention` lets the op run the same selection with a kernel backend."""
    hq = q.shape[1]
    idx = topk_indices(q, k, min(top_k, k.shape[2]), causal=causal)
    return sparse_attention(q, per_query_head(k, hq), per_query_head(v, hq), idx, causal=causal, scale=scale)
