"""Per-row top-k softmax attention, chunked over queries (the "torch" backend).

Per chunk of query rows: the scores against every visible key (one matmul), each row's top_k kept through a
scattered mask, a masked softmax and one matmul with V. That is dense-attention speed on a CPU (gathering
top_k K/V rows per query costs far more there than the skipped flops), with memory O(chunk x Sk), never
[Sq, Sk] at once. The backward recomputes each chunk under autograd with the selection taken outside it
(not differentiated: gradients flow through the selected keys only). Keys a row cannot see or does not select
never enter its arithmetic, also when they hold NaN or Inf (dsattn.torch_backend._hidden_keys: no host read,
so the same code runs traced). Semantics: SPEC and dsattn.reference.topk_sparse_attention. `topk_indices` and
`per_query_head` serve the Triton path.
"""

import torch

from dsattn.torch_backend import _hidden_keys

# Score elements held per query chunk (B x Hq x rows x Sk; ~8 MiB in fp32, plus a bool mask and top-k indices).
CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _few(seq_q: int, seq_k: int, top_k: int, causal: bool) -> int:
    """The leading rows that see at most top_k keys (each takes every key it sees)."""
    return min(seq_q, max(0, top_k - (seq_k - seq_q))) if causal else (seq_q if seq_k <= top_k else 0)


def chunks(q, k, top_k: int, causal: bool, chunk_elements: int | None = None):
    """(start, stop, last, select) per query chunk that sees a key: rows [start, stop) over keys [0, last);
    select False where every row sees at most top_k keys (nothing to select: causal rows before `few`)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    rows = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // max(1, b * hq * sk))
    few = _few(sq, sk, top_k, causal)
    starts = [*range(0, few, rows), *range(few, sq, rows)]  # chunks end at `few`
    for start, stop in zip(starts, [*starts[1:], sq]):
        last = min(sk, stop + sk - sq) if causal else sk  # keys after the chunk's last row: seen by none
        if last > 0:
            yield start, stop, last, stop > few


def attend_chunk(q_rows, k_span, v_span, bad_v, start: int, seq_q: int, seq_k: int, top_k: int, causal: bool,
                 scale: float, select: bool):
    """(out, taken) for q_rows [B, Hq, c, Dqk] over keys [0, span) (finite V, and K where a gradient is
    recorded: _hidden): out [B, Hq, c, Dv] in the compute dtype; taken [B, Hq, c, 1]: NaN in the rows that
    select a value row holding NaN / Inf (bad_v [B, Hkv, span]), 0 elsewhere, or None without selection
    (_hidden counted them). Where no gradient is recorded, out is computed in place and those rows are NaN
    already (through the row sums); else the backward adds taken to dq."""
    b, hq, rows, dqk = q_rows.shape
    hkv, last = k_span.shape[1], k_span.shape[2]
    compute = k_span.dtype
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_rows, k_span, v_span)))
    qc = q_rows.to(compute).reshape(b, hkv, hq // hkv, rows, dqk)
    scores = torch.einsum("bhgcd,bhkd->bhgck", qc, k_span)
    scores = scores.mul_(scale) if inplace else scores * scale
    position = torch.arange(start, start + rows, device=q_rows.device) + (seq_k - seq_q)
    if causal:
        future = torch.arange(last, device=q_rows.device)[None, :] > position[:, None]
        scores = scores.masked_fill_(future, float("-inf")) if inplace else scores.masked_fill(future, float("-inf"))
    taken = None
    if select:  # some row sees more than top_k keys
        chosen = scores.detach().topk(min(top_k, last), dim=-1, sorted=False).indices  # a set: no sort
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
        # Also drops chosen -inf (invisible) keys.
        scores = scores.masked_fill_(~keep, float("-inf")) if inplace else scores.masked_fill(~keep, float("-inf"))
        del keep
        bad = bad_v[:, :, None, None, :].expand(*chosen.shape[:-1], last).gather(-1, chosen)
        if causal:
            bad &= chosen <= position[:, None]  # a chosen invisible key (a row seeing fewer than top_k)
        taken = torch.where(bad.any(-1, keepdim=True), float("nan"), 0.0).to(compute)  # [B, Hkv, G, c, 1]
        del chosen, bad
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = scores.sub_(row_max).exp_() if inplace else (scores - row_max).exp()
    denom = probs.sum(dim=-1, keepdim=True)
    o = torch.einsum("bhgck,bhkv->bhgcv", probs, v_span)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    if taken is not None and inplace:
        denom = denom + taken
    o = o / denom
    return o.reshape(b, hq, rows, v_span.shape[-1]), None if taken is None else taken.reshape(b, hq, rows, 1)


def _hidden(q, k, v, top_k: int, causal: bool, dim: int, dtype, grad: bool):
    """(k, v, bad_v, start) for the chunks: v with its NaN / Inf entries zeroed, k too where grad (the forward
    masks the scores of such keys like those of any key hidden from a row), the value rows that held one, and
    the starting value of the output (dim Dv) or of dq (Dqk) in dtype: NaN in the rows that see a key row
    holding one (its score is unknown: the oracle's selection may take it) or, taking every key they see (the
    rows before _few), a value row holding one; 0 elsewhere (dsattn.torch_backend._hidden_keys)."""
    sq, hq, hkv, sk = q.shape[2], q.shape[1], k.shape[1], k.shape[2]
    compute = _compute_dtype(q)
    bad_k, bad_v = _hidden_keys.bad_rows(k, compute), _hidden_keys.bad_rows(v, compute)
    rows = torch.arange(sq, device=q.device)
    lo = torch.zeros_like(rows)
    hi = (rows + (sk - sq + 1)).clamp(0, sk) if causal else torch.full_like(rows, sk)
    counts = _hidden_keys.range_counts(bad_k, lo, hi)
    counts = counts + _hidden_keys.range_counts(bad_v, lo, hi) * (rows < _few(sq, sk, top_k, causal))
    start = _hidden_keys.nan_rows(counts, hq // hkv, dim, dtype)
    kc = k.to(compute)
    if grad:
        kc = _hidden_keys.finite(kc, inplace=k.dtype != compute)  # (a copy already)
    return kc, _hidden_keys.finite(v.to(compute), inplace=v.dtype != compute), bad_v, start


def topk_sparse_attention(q, k, v, top_k: int, *, causal: bool = True, scale: float | None = None,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype, computed in
    float32 (float64 for float64). A row with no visible key outputs zeros."""
    b, hq, sq, dqk = q.shape
    sk, dv = k.shape[2], v.shape[3]
    scale = dqk**-0.5 if scale is None else scale
    if b * hq * sq * dv == 0 or sk == 0:
        return torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # (called under autograd)
    kc, vc, bad_v, out = _hidden(q, k, v, top_k, causal, dv, q.dtype, grad=recording)
    for start, stop, last, select in chunks(q, k, top_k, causal, chunk_elements):
        o, taken = attend_chunk(q[:, :, start:stop], kc[:, :, :last], vc[:, :, :last], bad_v[:, :, :last], start,
                                sq, sk, top_k, causal, scale, select)
        out[:, :, start:stop].add_(o if taken is None or not recording else o + taken)
    return out


def topk_sparse_attention_backward(grad_out, q, k, v, top_k: int, *, causal: bool, scale: float,
                                   chunk_elements: int | None = None):
    """(dq, dk, dv) for grad_out [B, Hq, Sq, Dv]: each chunk recomputed under autograd (O(chunk x Sk) memory),
    its selection the forward's (same scores, same top-k); gradients accumulate in the compute dtype and come
    back in the inputs' dtypes."""
    sq, sk = q.shape[2], k.shape[2]
    compute = _compute_dtype(q)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    if grad_out.numel() == 0 or sk == 0:
        return torch.zeros_like(q), dk.to(k.dtype), dv.to(v.dtype)
    kc, vc, bad_v, dq = _hidden(q, k, v, top_k, causal, q.shape[3], compute, grad=True)
    for start, stop, last, select in chunks(q, k, top_k, causal, chunk_elements):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True)
                      for t in (q[:, :, start:stop].to(compute), kc[:, :, :last], vc[:, :, :last])]
            o, taken = attend_chunk(*leaves, bad_v[:, :, :last], start, sq, sk, top_k, causal, scale, select)
            gq, gk, gv = torch.autograd.grad(o, leaves, grad_out[:, :, start:stop].to(compute))
        dq[:, :, start:stop].add_(gq if taken is None else gq.add_(taken))
        dk[:, :, :last].add_(gk)
        dv[:, :, :last].add_(gv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def topk_indices(q, k, top_k: int, *, causal: bool = True, chunk_elements: int | None = None) -> torch.Tensor:
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D] -> int32 [B, Hq, Sq, top_k]: each row's top_k visible keys by q.k
    (per query head; -1 padded), in query chunks (memory O(chunk x Sk)). The Triton path's selection beyond
    the indexer kernel's top_k limit."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.full((b, hq, sq, top_k), -1, dtype=torch.int32, device=q.device)
    if out.numel() == 0 or sk == 0:
        return out
    compute = _compute_dtype(q)
    kc = k.to(compute)
    for start, stop, last, _ in chunks(q, k, 0, causal, chunk_elements):  # top_k 0: every chunk selects
        qc = q[:, :, start:stop].to(compute).reshape(b, hkv, hq // hkv, stop - start, d)
        scores = torch.einsum("bhgcd,bhkd->bhgck", qc, kc[:, :, :last]).reshape(b, hq, stop - start, last)
        if causal:
            position = torch.arange(start, stop, device=q.device) + (sk - sq)
            scores.masked_fill_(torch.arange(last, device=q.device)[None, :] > position[:, None], float("-inf"))
        best = scores.topk(min(top_k, last), dim=-1)
        chosen = torch.where(best.values != float("-inf"), best.indices, -1)  # -inf: invisible (NaN kept)
        out[:, :, start:stop, : chosen.shape[-1]] = chosen.to(torch.int32)
    return out


def per_query_head(t, heads_q: int):
    """[B, Hkv, S, D] -> [B, Hq, S, D]: one "kv head" per query head, since the selection is per query head
    (a view without GQA; with GQA groups > 1 this copies K/V once)."""
    b, hkv = t.shape[:2]
    if hkv == heads_q:
        return t
    return t[:, :, None].expand(b, hkv, heads_q // hkv, *t.shape[2:]).reshape(b, heads_q, *t.shape[2:])
