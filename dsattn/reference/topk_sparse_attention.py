"""Per-row top-k softmax attention in plain PyTorch: each (query, head) attends to its top_k keys by q.k.

The reference (and the torch backend) works on chunks of query rows: the scores against every visible key
(one matmul), each row's top_k kept through a scattered mask, a masked softmax and one matmul with V. That
is dense-attention speed on a CPU (gathering top_k K/V rows per query costs far more there than the skipped
flops), with memory O(chunk x Sk), never [Sq, Sk] at once. `topk_indices` (the indexer's streaming top-k with
one unit-weight head per query head, no relu) is the selection the kernel backends share.
"""

import torch

from dsattn.reference.lightning_indexer_topk import lightning_indexer_topk
from dsattn.reference.sparse_attention import softmax_attend

# Score elements held per query chunk (B x Hq x rows x Sk; ~8 MiB in fp32, plus a bool mask and top-k indices).
CHUNK_ELEMENTS = 1 << 21


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


def topk_sparse_attention(q, k, v, top_k, *, causal=True, scale=None, chunk_elements=CHUNK_ELEMENTS):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype, computed in
    float32 (float64 for float64). A row with no visible key outputs zeros."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    scale = dqk**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or sk == 0:
        return out
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc, vc = k.to(compute), v.to(compute)
    rows = max(1, chunk_elements // max(1, b * hq * sk))
    # Causal rows before `few` see at most top_k keys and keep them all: chunks end there, and skip selection.
    few = min(sq, max(0, top_k - (sk - sq))) if causal else (sq if sk <= top_k else 0)
    starts = [*range(0, few, rows), *range(few, sq, rows)]
    for start, stop in zip(starts, [*starts[1:], sq]):
        # Causal: keys after the chunk's last row are visible to none of its rows.
        last = min(sk, stop - 1 + sk - sq + 1) if causal else sk
        if last <= 0:
            continue
        qc = q[:, :, start:stop].to(compute).reshape(b, hkv, groups, stop - start, dqk)
        # In place from the scores on: one [B, Hq, c, last] score buffer and one bool mask (memory is speed).
        scores = torch.einsum("bhgcd,bhkd->bhgck", qc, kc[:, :, :last]).mul_(scale)
        if causal:
            position = torch.arange(start, stop, device=q.device) + (sk - sq)
            scores.masked_fill_(torch.arange(last, device=q.device)[None, :] > position[:, None], float("-inf"))
        if stop > few:  # some row sees more than top_k keys
            chosen = scores.topk(min(top_k, last), dim=-1, sorted=False).indices  # a set: no sort (2x faster)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
            del chosen
            scores.masked_fill_(~keep, float("-inf"))  # also drops chosen -inf (invisible) keys
            del keep
        o = softmax_attend(scores, vc[:, :, :last], "bhgck,bhkv->bhgcv")
        out[:, :, start:stop] = o.reshape(b, hq, stop - start, dv).to(q.dtype)
    return out
