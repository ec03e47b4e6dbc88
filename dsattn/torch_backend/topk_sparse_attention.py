"""Per-row top-k softmax attention, chunked over queries (the "torch" backend).

Per chunk of query rows: the scores against every visible key (one matmul), each row's top_k kept through a
scattered mask, a masked softmax and one matmul with V. That is dense-attention speed on a CPU (gathering
top_k K/V rows per query costs far more there than the skipped flops), with memory O(chunk x Sk), never
[Sq, Sk] at once. The backward recomputes each chunk under autograd with the selection taken outside it
(not differentiated: gradients flow through the selected keys only). Keys a row cannot see or does not select
never enter its arithmetic, also when they hold NaN or Inf (dsattn.torch_backend._hidden_keys). Semantics: SPEC
and dsattn.reference.topk_sparse_attention. `topk_indices` and `per_query_head` serve the Triton path.
"""

import torch

from dsattn.torch_backend import _hidden_keys

# Score elements held per query chunk (B x Hq x rows x Sk; ~8 MiB in fp32, plus a bool mask and top-k indices).
CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def chunks(q, k, top_k: int, causal: bool, chunk_elements: int | None = None):
    """(start, stop, last, select) per query chunk that sees a key: rows [start, stop) over keys [0, last);
    select False where every row sees at most top_k keys (nothing to select: causal rows before `few`)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    rows = max(1, (CHUNK_ELEMENTS if chunk_elements is None else chunk_elements) // max(1, b * hq * sk))
    few = min(sq, max(0, top_k - (sk - sq))) if causal else (sq if sk <= top_k else 0)
    starts = [*range(0, few, rows), *range(few, sq, rows)]  # chunks end at `few`
    for start, stop in zip(starts, [*starts[1:], sq]):
        last = min(sk, stop + sk - sq) if causal else sk  # keys after the chunk's last row: seen by none
        if last > 0:
            yield start, stop, last, stop > few


def attend_chunk(q_rows, k_span, v_span, start: int, seq_q: int, seq_k: int, top_k: int, causal: bool,
                 scale: float, select: bool, bad_cols=None):
    """Output rows [B, Hq, c, Dv] (compute dtype) of q_rows [B, Hq, c, Dqk] over keys [0, span). bad_cols: span
    positions of key rows holding NaN / Inf (_hidden_keys.span_columns), or None. In place where no gradient
    is recorded."""
    b, hq, rows, dqk = q_rows.shape
    hkv, last = k_span.shape[1], k_span.shape[2]
    compute = k_span.dtype
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_rows, k_span, v_span)))
    qc = q_rows.to(compute).reshape(b, hkv, hq // hkv, rows, dqk)
    future = None
    if causal:
        position = torch.arange(start, start + rows, device=q_rows.device) + (seq_k - seq_q)
        future = torch.arange(last, device=q_rows.device)[None, :] > position[:, None]
    if bad_cols is not None and future is not None:
        scores = _hidden_keys.scores(qc, k_span, ~future, bad_cols)
    else:  # (without causal every key of the span is visible to every row: no key to hide)
        scores = torch.einsum("bhgcd,bhkd->bhgck", qc, k_span)
    scores = scores.mul_(scale) if inplace else scores * scale
    if future is not None:
        scores = scores.masked_fill_(future, float("-inf")) if inplace else scores.masked_fill(future, float("-inf"))
    keep = None if future is None else ~future  # keys each row may take: for the non-finite rows' values
    if select:  # some row sees more than top_k keys
        chosen = scores.detach().topk(min(top_k, last), dim=-1, sorted=False).indices  # a set: no sort
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
        del chosen
        # Also drops chosen -inf (invisible) keys.
        scores = scores.masked_fill_(~keep, float("-inf")) if inplace else scores.masked_fill(~keep, float("-inf"))
        if bad_cols is None:
            keep = None
        elif future is not None:
            keep &= ~future  # a chosen -inf key (a row seeing fewer than top_k) stays hidden
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = scores.sub_(row_max).exp_() if inplace else (scores - row_max).exp()
    denom = probs.sum(dim=-1, keepdim=True)
    if bad_cols is not None and keep is not None:
        o = _hidden_keys.values(probs, v_span, keep, bad_cols)
    else:
        o = torch.einsum("bhgck,bhkv->bhgcv", probs, v_span)
    o = o / torch.where(denom > 0, denom, torch.ones_like(denom))
    return o.reshape(b, hq, rows, v_span.shape[-1])


def topk_sparse_attention(q, k, v, top_k: int, *, causal: bool = True, scale: float | None = None,
                          chunk_elements: int | None = None) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype, computed in
    float32 (float64 for float64). A row with no visible key outputs zeros."""
    b, hq, sq, dqk = q.shape
    sk, dv = k.shape[2], v.shape[3]
    scale = dqk**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or sk == 0:
        return out
    compute = _compute_dtype(q)
    kc, vc = k.to(compute), v.to(compute)
    bad = _hidden_keys.nonfinite_keys(k, v)
    for start, stop, last, select in chunks(q, k, top_k, causal, chunk_elements):
        o = attend_chunk(q[:, :, start:stop], kc[:, :, :last], vc[:, :, :last], start, sq, sk, top_k, causal,
                         scale, select, _hidden_keys.span_columns(bad, 0, last))
        out[:, :, start:stop] = o.to(q.dtype)
    return out


def topk_sparse_attention_backward(grad_out, q, k, v, top_k: int, *, causal: bool, scale: float,
                                   chunk_elements: int | None = None):
    """(dq, dk, dv) for grad_out [B, Hq, Sq, Dv]: each chunk recomputed under autograd (O(chunk x Sk) memory),
    its selection the forward's (same scores, same top-k); gradients accumulate in the compute dtype and come
    back in the inputs' dtypes."""
    sq, sk = q.shape[2], k.shape[2]
    compute = _compute_dtype(q)
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    if grad_out.numel() and sk:
        kc, vc = k.to(compute), v.to(compute)
        bad = _hidden_keys.nonfinite_keys(k, v)
        for start, stop, last, select in chunks(q, k, top_k, causal, chunk_elements):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True)
                          for t in (q[:, :, start:stop].to(compute), kc[:, :, :last], vc[:, :, :last])]
                o = attend_chunk(*leaves, start, sq, sk, top_k, causal, scale, select,
                                 _hidden_keys.span_columns(bad, 0, last))
                gq, gk, gv = torch.autograd.grad(o, leaves, grad_out[:, :, start:stop].to(compute))
            dq[:, :, start:stop] = gq
            dk[:, :, :last] += gk
            dv[:, :, :last] += gv
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
