"""DeepSeek-V3.2 lightning indexer + top-k, streamed (the "torch" backend; semantics: SPEC and the oracle
dsattn.reference.lightning_indexer_topk).

score[b, i, j] = sum_h weights[b, i, h] * relu(scale * q_idx[b, i, h, :] . k_idx[b, j, :])

Queries in chunks, keys in chunks, and a running top-k per query merged with each key chunk, so neither
[B, Sq, Hi, Sk] nor [B, Sq, Sk] ever exists (memory O(chunk_q x (top_k + chunk_k) x Hi)). Chunk bounds are
Python ints (no host read of tensor data), so it traces under torch.compile and runs on fake tensors.
The output is indices: nothing here is differentiated.
"""

import torch

QUERY_CHUNK = 256
KEY_CHUNK = 2048


def indexer_scores(q_idx, k_idx, weights, scale, *, relu=True) -> torch.Tensor:
    """Scores of a query chunk against a key chunk: [B, cq, Hi, D] x [B, ck, D] -> [B, cq, ck] (float32/64)."""
    compute = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkd->bqhk", q_idx.to(compute), k_idx.to(compute)) * scale
    if relu:
        s = torch.relu(s)
    return torch.einsum("bqhk,bqh->bqk", s, weights.to(compute))


def lightning_indexer_topk(
    q_idx, k_idx, weights, top_k, *, scale=None, causal=True, relu=True,
    query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK,
) -> torch.Tensor:
    """q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi] -> int32 [B, Sq, top_k]: indices of the
    highest scores among visible keys (causal: j <= i + Sk - Sq), in descending score order, -1 padded.
    Ties go as torch.topk breaks them (as transformers' own V3.2 indexer does).
    `relu=False` ranks raw weighted dot products (topk_sparse_attention's selection; not part of the public op).
    """
    b, sq, _, d = q_idx.shape
    sk = k_idx.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.full((b, sq, top_k), -1, dtype=torch.int32, device=q_idx.device)
    if sq == 0 or sk == 0:
        return out
    compute = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
    for qs in range(0, sq, query_chunk):
        qe = min(qs + query_chunk, sq)
        pos = torch.arange(qs, qe, device=q_idx.device) + (sk - sq)  # absolute query positions
        # Causal: keys after the chunk's last row are visible to none of its rows (and never read).
        last_key = min(sk, qe + sk - sq) if causal else sk
        if last_key <= 0:
            continue
        best_s = torch.full((b, qe - qs, 0), float("-inf"), dtype=compute, device=q_idx.device)
        best_i = torch.empty((b, qe - qs, 0), dtype=torch.int64, device=q_idx.device)
        for ks in range(0, last_key, key_chunk):
            ke = min(ks + key_chunk, last_key)
            s = indexer_scores(q_idx[:, qs:qe], k_idx[:, ks:ke], weights[:, qs:qe], scale, relu=relu)
            idx = torch.arange(ks, ke, device=q_idx.device).expand(b, qe - qs, -1)
            if causal:  # a later key's score (NaN included) becomes -inf: it never wins, and maps to -1 below
                s = s.masked_fill(idx > pos[None, :, None], float("-inf"))
            cand_s = torch.cat([best_s, s], dim=-1)
            cand_i = torch.cat([best_i, idx], dim=-1)
            keep = min(top_k, cand_s.shape[-1])
            best_s, sel = cand_s.topk(keep, dim=-1)
            best_i = cand_i.gather(-1, sel)
        n = best_s.shape[-1]
        chosen = torch.where(torch.isfinite(best_s), best_i, torch.full_like(best_i, -1))
        out[:, qs:qe, :n] = chosen.to(torch.int32)
    return out
