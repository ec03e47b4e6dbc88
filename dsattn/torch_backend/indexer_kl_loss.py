"""DeepSeek-V3.2's indexer KL objective, streamed (the "torch" backend; semantics: SPEC and the oracle
dsattn.reference.indexer_kl_loss).

Queries in chunks, keys in chunks (dense: slices of k / k_idx; sparse: the row's listed keys, gathered), two
passes per query chunk:
1. stats: the target's per-head log-sum-exp L[b, h, i] and the index scores' log-sum-exp lse_I[b, i], online;
2. KL per row = sum_j p_j log p_j - sum_j p_j I_j + lse_I (sum_j p_j = 1), with p_j = mean_h exp(s_hj - L_h);
   for the backward, dI_j = grad * (exp(I_j - lse_I) - p_j) / rows, taken through the relu into the gradients
   of q_idx, k_idx and weights.
Memory O(chunk_q x chunk_k x max(H, Hi)): never [B, Sq, Sk]. Chunk bounds are Python ints (no host read of
tensor data), so it traces under torch.compile and runs on fake tensors.
"""

import torch

QUERY_CHUNK = 64
KEY_CHUNK = 256
# Elements of one gathered key tile [B, Hkv, chunk_q, chunk_k, Dqk] in the sparse stage: bounds chunk_q.
GATHER_BUDGET = 1 << 22


def clean_indices(indices: torch.Tensor, seq_q: int, seq_k: int, causal: bool) -> torch.Tensor:
    """int64 [B, Sq, topk]: each row's listed keys that it may see (in [0, Sk), causal: not after its
    position), each once, ascending, then -1. A duplicate counts once (the oracle's set semantics)."""
    idx = indices.long()
    valid = (idx >= 0) & (idx < seq_k)
    if causal:
        pos = torch.arange(seq_q, device=idx.device)[:, None] + (seq_k - seq_q)
        valid &= idx <= pos
    keys = torch.where(valid, idx, seq_k).sort(dim=-1).values  # "no key" sorts last as Sk
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = keys[..., 1:] == keys[..., :-1]
    return torch.where((keys < seq_k) & ~repeat, keys, -1)


def row_count(clean, batch: int, seq_q: int, seq_k: int, causal: bool):
    """How many rows (b, i) see a key (the loss's divisor, at least 1): a tensor for sparse lists, an int for
    the dense stage."""
    if clean is not None:
        return (clean >= 0).any(dim=-1).sum().clamp(min=1)
    rows = (min(seq_q, seq_k) if causal else seq_q) if seq_k > 0 else 0
    return max(1, batch * rows)


def prepare(q_idx, k_idx, indices, causal: bool):
    """(the cleaned lists or None for the dense stage, the loss's row count): what the forward and the backward
    of both backends start from."""
    b, sq = q_idx.shape[:2]
    sk = k_idx.shape[1]
    clean = None if indices is None else clean_indices(indices, sq, sk, causal)
    return clean, row_count(clean, b, sq, sk, causal)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Tiles:
    """The (query chunk, key chunk) tiles of one call: scores and masks, dense or gathered."""

    def __init__(self, q_idx, k_idx, weights, q, k, clean, scale, index_scale, causal, query_chunk, key_chunk):
        self.compute = _compute_dtype(q_idx)
        self.q_idx, self.k_idx = q_idx.to(self.compute), k_idx.to(self.compute)
        self.weights, self.q, self.k = weights.to(self.compute), q.to(self.compute), k.to(self.compute)
        self.clean, self.scale, self.index_scale, self.causal = clean, scale, index_scale, causal
        self.b, self.sq, self.hi, _ = q_idx.shape
        self.h, self.hkv, self.sk, dqk = q.shape[1], k.shape[1], k.shape[2], q.shape[3]
        self.key_chunk = key_chunk
        if clean is not None:  # bound the gathered key tile
            width = min(key_chunk, clean.shape[-1])
            query_chunk = max(1, min(query_chunk, GATHER_BUDGET // max(1, self.b * self.hkv * width * dqk)))
        self.query_chunk = query_chunk

    def query_chunks(self):
        for qs in range(0, self.sq, self.query_chunk):
            yield qs, min(qs + self.query_chunk, self.sq)

    def key_chunks(self, qs, qe):
        if self.clean is not None:
            if self.sk == 0:  # every entry is "no key" (and there is no row to gather)
                return []
            return [(ks, min(ks + self.key_chunk, self.clean.shape[-1]))
                    for ks in range(0, self.clean.shape[-1], self.key_chunk)]
        # Causal: keys after the chunk's last row are visible to none of its rows (and never read).
        last_key = min(self.sk, qe + self.sk - self.sq) if self.causal else self.sk
        return [(ks, min(ks + self.key_chunk, last_key)) for ks in range(0, max(0, last_key), self.key_chunk)]

    def tile(self, qs, qe, ks, ke):
        """(s [B, H, cq, ck] target logits, a [B, cq, Hi, ck] index pre-activations (index_scale applied),
        I [B, cq, ck], valid [B, cq, ck], keys: the k_idx rows [B, cq, ck, Di] or [B, ck, Di], key ids
        [B, cq, ck] or None). Entries that are not valid are unspecified: callers mask them with where."""
        b, cq = self.b, qe - qs
        qc = self.q[:, :, qs:qe].unflatten(1, (self.hkv, self.h // self.hkv))  # [B, Hkv, G, cq, D]
        qi = self.q_idx[:, qs:qe]
        if self.clean is None:
            kc = self.k[:, :, ks:ke]
            ki = self.k_idx[:, ks:ke]
            s = torch.einsum("bngqd,bnkd->bngqk", qc, kc)
            a = torch.einsum("bqhd,bkd->bqhk", qi, ki)
            key = torch.arange(ks, ke, device=qi.device)
            pos = torch.arange(qs, qe, device=qi.device) + (self.sk - self.sq)
            valid = (key[None, :] <= pos[:, None]) if self.causal else torch.ones(cq, ke - ks, dtype=torch.bool,
                                                                                    device=qi.device)
            valid = valid.expand(b, cq, ke - ks)
            ids = None
        else:
            ids = self.clean[:, qs:qe, ks:ke]
            valid = ids >= 0
            safe = ids.clamp(min=0)
            batch = torch.arange(b, device=qi.device)[:, None, None]
            kc = self.k[batch, :, safe].permute(0, 3, 1, 2, 4)  # [B, Hkv, cq, ck, D]
            ki = self.k_idx[batch, safe]  # [B, cq, ck, Di]
            # A gathered padding key (key 0 stands in for -1) must not reach gradients through 0 * NaN.
            kc = torch.where(valid[:, None, ..., None], kc, 0.0)
            ki = torch.where(valid[..., None], ki, 0.0)
            s = torch.einsum("bngqd,bnqkd->bngqk", qc, kc)
            a = torch.einsum("bqhd,bqkd->bqhk", qi, ki)
        s = s.flatten(1, 2) * self.scale
        a = a * self.index_scale
        scores = torch.einsum("bqhk,bqh->bqk", torch.relu(a), self.weights[:, qs:qe])
        return s, a, scores, valid, ki, ids


def _lse_update(m, total, x, valid, dims):
    """Online log-sum-exp over the last dim of x where valid: running max m and sum total (exp(x - m))."""
    x = torch.where(valid, x, float("-inf"))
    new_m = torch.maximum(m, x.amax(dim=-1))
    safe = torch.where(torch.isfinite(new_m), new_m, 0.0)
    total = total * torch.exp(m - safe) + torch.where(valid, torch.exp(x - safe[..., None]), 0.0).sum(dim=-1)
    return new_m, total


def _finish_lse(m, total):
    return torch.where(total > 0, m + torch.log(total), float("-inf"))


def _stats(tiles: _Tiles, qs: int, qe: int):
    """Pass 1 for one query chunk: L [B, H, cq] and lse_I [B, cq] (-inf for rows that see no key)."""
    b, cq = tiles.b, qe - qs
    kw = dict(dtype=tiles.compute, device=tiles.q.device)
    m_s, t_s = torch.full((b, tiles.h, cq), float("-inf"), **kw), torch.zeros((b, tiles.h, cq), **kw)
    m_i, t_i = torch.full((b, cq), float("-inf"), **kw), torch.zeros((b, cq), **kw)
    for ks, ke in tiles.key_chunks(qs, qe):
        s, _, scores, valid, _, _ = tiles.tile(qs, qe, ks, ke)
        m_s, t_s = _lse_update(m_s, t_s, s, valid[:, None], -1)
        m_i, t_i = _lse_update(m_i, t_i, scores, valid, -1)
    return _finish_lse(m_s, t_s), _finish_lse(m_i, t_i)


def _target(s, lse, valid):
    """p [B, cq, ck]: the mean over heads of exp(s - L), 0 where not valid (and in rows that see nothing)."""
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    return torch.where(valid[:, None], torch.exp(s - safe[..., None]), 0.0).mean(dim=1)


def indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, *, indices=None, scale: float, index_scale: float,
                        causal: bool = True, query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
    """(loss (scalar, float32; float64 for float64 q_idx), L [B, H, Sq], lse_I [B, Sq]) with the log-sum-exps
    in the loss's dtype (-inf for rows that see no key): what the backward reuses."""
    b, sq = q_idx.shape[:2]
    clean, rows = prepare(q_idx, k_idx, indices, causal)
    tiles = _Tiles(q_idx, k_idx, weights, q, k, clean, scale, index_scale, causal, query_chunk, key_chunk)
    kw = dict(dtype=tiles.compute, device=q_idx.device)
    lse_s = torch.full((b, tiles.h, sq), float("-inf"), **kw)
    lse_i = torch.full((b, sq), float("-inf"), **kw)
    kl = torch.zeros((b, sq), **kw)
    for qs, qe in tiles.query_chunks():
        ls, li = _stats(tiles, qs, qe)
        lse_s[:, :, qs:qe], lse_i[:, qs:qe] = ls, li
        acc = torch.zeros((b, qe - qs), **kw)
        for ks, ke in tiles.key_chunks(qs, qe):
            s, _, scores, valid, _, _ = tiles.tile(qs, qe, ks, ke)
            p = _target(s, ls, valid)
            acc += torch.where(valid, torch.xlogy(p, p) - p * torch.where(valid, scores, 0.0), 0.0).sum(dim=-1)
        kl[:, qs:qe] = torch.where(torch.isfinite(li), acc + li, 0.0)
    loss = kl.sum() / rows
    return loss, lse_s, lse_i


def indexer_kl_loss_bwd(grad, q_idx, k_idx, weights, q, k, lse_s, lse_i, *, indices=None, scale: float,
                        index_scale: float, causal: bool = True, query_chunk: int = QUERY_CHUNK,
                        key_chunk: int = KEY_CHUNK):
    """Gradients (q_idx, k_idx, weights) of loss * grad, each in its input's dtype, from the forward's
    log-sum-exps (pass 2 again, with dI = grad * (softmax(I) - p) / rows per key chunk)."""
    b, sk = q_idx.shape[0], k_idx.shape[1]
    clean, rows = prepare(q_idx, k_idx, indices, causal)
    tiles = _Tiles(q_idx, k_idx, weights, q, k, clean, scale, index_scale, causal, query_chunk, key_chunk)
    g = grad.to(tiles.compute) / rows
    dq = torch.zeros(q_idx.shape, dtype=tiles.compute, device=q_idx.device)
    dk = torch.zeros(k_idx.shape, dtype=tiles.compute, device=q_idx.device)
    dw = torch.zeros(weights.shape, dtype=tiles.compute, device=q_idx.device)
    lse_s, lse_i = lse_s.to(tiles.compute), lse_i.to(tiles.compute)
    for qs, qe in tiles.query_chunks():
        ls, li = lse_s[:, :, qs:qe], lse_i[:, qs:qe]
        li_safe = torch.where(torch.isfinite(li), li, 0.0)
        w = tiles.weights[:, qs:qe]
        qi = tiles.q_idx[:, qs:qe]
        for ks, ke in tiles.key_chunks(qs, qe):
            s, a, scores, valid, ki, ids = tiles.tile(qs, qe, ks, ke)
            p = _target(s, ls, valid)
            d_scores = torch.where(valid, torch.exp(scores - li_safe[..., None]) - p, 0.0) * g
            dw[:, qs:qe] += torch.einsum("bqk,bqhk->bqh", d_scores, torch.relu(a))
            da = torch.where(a > 0, d_scores[:, :, None, :] * w[..., None], 0.0) * tiles.index_scale
            if ids is None:
                dq[:, qs:qe] += torch.einsum("bqhk,bkd->bqhd", da, ki)
                dk[:, ks:ke] += torch.einsum("bqhk,bqhd->bkd", da, qi)
            else:
                dq[:, qs:qe] += torch.einsum("bqhk,bqkd->bqhd", da, ki)
                dk_rows = torch.einsum("bqhk,bqhd->bqkd", da, qi)
                dk_rows = torch.where(valid[..., None], dk_rows, 0.0)
                flat = (ids.clamp(min=0) + torch.arange(b, device=ids.device)[:, None, None] * sk).flatten()
                dk.view(b * sk, -1).index_add_(0, flat, dk_rows.flatten(0, 2))
    return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(weights.dtype)


def indexer_kl_loss(q_idx, k_idx, weights, q, k, *, indices=None, scale: float, index_scale: float,
                    causal: bool = True, query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
    """The loss alone (see indexer_kl_loss_fwd)."""
    return indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, indices=indices, scale=scale, index_scale=index_scale,
                               causal=causal, query_chunk=query_chunk, key_chunk=key_chunk)[0]
