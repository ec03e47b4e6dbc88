"""Index-driven sparse attention, chunked over queries (the "torch" backend).

Semantics: SPEC and dsattn.reference.sparse_attention (-1, out-of-range and, with causal=True, future entries
are "no key"; a key listed twice counts twice; a row with no valid key outputs zeros). Rows are processed in
chunks so that memory is O(chunk x topk x D) or O(chunk x Sk), never O(Sq x Sk). Two strategies per chunk,
same result:
- "gather": gather each row's listed K/V rows and attend over them (cost O(rows x topk x D)); wins when
  topk is a small part of the visible keys (decode, long contexts). Entries that are no key are zeroed after
  the gather, so a NaN/Inf in a key or value a row does not list never reaches it.
- "dense": score every visible key with one matmul, weight each key by how often the row lists it (a
  scatter-add of counts; 0 = not listed) inside the softmax, one matmul with V. On a CPU, gathering K/V rows
  per query costs more than the skipped flops once topk is a sizeable part of the keys (DeepSeek-V3.2's
  indexer at short context: top_k 256 of 1024 keys). Its matmuls take V (and K in the backward) with NaN /
  Inf entries zeroed, and the rows listing such a key are NaN (dsattn.torch_backend._hidden_keys, no host
  read): no other row sees them.
The backward recomputes each chunk under autograd (O(chunk) memory, like the forward); the forward works in
place where no gradient is recorded.
"""

import torch

from dsattn.torch_backend import _hidden_keys

# Elements of gathered K plus V held per chunk (~64 MiB in fp32), and at most half the elements of q, k and v
# (not below MIN_CHUNK_ELEMENTS): the backward holds about three times a chunk (the gathered rows, their
# gradients, the scores), so its peak stays within a small multiple of its inputs plus their gradients even
# when K/V are few (MQA); score elements per "dense" chunk.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_ELEMENTS = 1 << 20
DENSE_CHUNK_ELEMENTS = 1 << 21
# "auto" takes "dense" when Hq x (keys a row sees, on average) is at most this many times Hkv x topk (rows
# gathered): the crossover measured on a 2-core CPU (fp32, D=64, causal) from prefill to decode shapes.
DENSE_WORK_PER_GATHERED_ROW = 24
STRATEGIES = ("auto", "gather", "dense")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _strategy(q, k, indices, causal: bool, strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"sparse_attention torch backend: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    hq, sq, hkv, sk, topk = q.shape[1], q.shape[2], k.shape[1], k.shape[2], indices.shape[-1]
    seen = sk - min(sq, sk) / 2 if causal else sk  # causal rows see i + Sk - Sq + 1 keys
    return "dense" if hq * seen <= DENSE_WORK_PER_GATHERED_ROW * hkv * topk else "gather"


def _per_kv_head(indices, b: int, hkv: int, sq: int) -> torch.Tensor:
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)
    return indices.expand(b, hkv, sq, indices.shape[-1])


def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _attend(scores, v, equation: str, counts=None):
    """Softmax over the last dim of scores (-inf: not attended), each key's exp(s) times its listing count
    when counts is given, contracted with v by einsum(equation, probs, v) and divided by the row sums; a row
    with no finite score gives zeros. Overwrites scores in place unless autograd records it."""
    inplace = not _recording(scores, v)
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = scores.sub_(row_max).exp_() if inplace else (scores - row_max).exp()
    if counts is not None:
        probs = probs.mul_(counts) if inplace else probs * counts
    denom = probs.sum(dim=-1, keepdim=True)
    o = torch.einsum(equation, probs, v)
    return o / torch.where(denom > 0, denom, torch.ones_like(denom))


# --------------------------------------------------------------------------------------------- gather
def _gather_chunks(q, k, v, indices, chunk_size):
    b, sq, dqk = q.shape[0], q.shape[2], q.shape[3]
    if chunk_size is None:
        budget = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, (q.numel() + k.numel() + v.numel()) // 2))
        chunk_size = max(1, budget // max(1, b * k.shape[1] * indices.shape[-1] * (dqk + v.shape[3])))
    return range(0, sq, chunk_size), chunk_size


def _gather_rows(k, v, idx, start: int, seq_q: int, causal: bool, compute):
    """The listed K/V rows of query rows [start, start + c): idx [B, Hkv, c, T] -> k_rows [B, Hkv, c, T, Dqk],
    v_rows [..., Dv] in the compute dtype (zero where an entry is no key), the validity mask and the flat
    gather index."""
    b, hkv, sk, dqk = k.shape
    dv = v.shape[3]
    rows, topk = idx.shape[2], idx.shape[3]
    idx = idx.long()
    valid = (idx >= 0) & (idx < sk)
    if causal:
        position = torch.arange(start, start + rows, device=k.device) + (sk - seq_q)
        valid &= idx <= position[:, None]
    flat = torch.where(valid, idx, 0).reshape(b, hkv, rows * topk, 1)
    k_rows = torch.gather(k, 2, flat.expand(-1, -1, -1, dqk)).view(b, hkv, rows, topk, dqk).to(compute)
    v_rows = torch.gather(v, 2, flat.expand(-1, -1, -1, dv)).view(b, hkv, rows, topk, dv).to(compute)
    # Fresh tensors (the gather's output): zeroed in place, outside autograd.
    k_rows = k_rows.masked_fill_(~valid[..., None], 0)
    v_rows = v_rows.masked_fill_(~valid[..., None], 0)
    return k_rows, v_rows, valid, flat


def _gather_chunk(q_rows, k_rows, v_rows, valid, scale: float):
    """Output rows [B, Hq, c, Dv] (compute dtype) of q_rows [B, Hq, c, Dqk] over their gathered rows."""
    b, hq, rows, dqk = q_rows.shape
    hkv = k_rows.shape[1]
    q_rows = q_rows.reshape(b, hkv, hq // hkv, rows, dqk).to(k_rows.dtype)
    # Scaled out of place: the einsum's output is a permuted view, which in-place steps cannot re-view traced.
    scores = torch.einsum("bhgcd,bhctd->bhgct", q_rows, k_rows) * scale
    if _recording(q_rows, k_rows):
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    else:
        scores = scores.masked_fill_(~valid[:, :, None], float("-inf"))
    o = _attend(scores, v_rows, "bhgct,bhctv->bhgcv")
    return o.reshape(b, hq, rows, v_rows.shape[-1])


# ---------------------------------------------------------------------------------------------- dense
def _dense_chunk_size(q, k, chunk_size):
    if chunk_size is None:
        chunk_size = max(1, DENSE_CHUNK_ELEMENTS // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    return chunk_size


def _dense_last(start: int, stop: int, seq_q: int, seq_k: int, causal: bool) -> int:
    """Keys [0, last) some row of the chunk may list: causal rows see nothing after the last row's position."""
    return min(seq_k, stop + seq_k - seq_q) if causal else seq_k


def _dense_counts(idx, start: int, seq_q: int, seq_k: int, last: int, causal: bool, compute):
    """[B, Hkv, 1, c, last]: how often each row lists each key (0: not listed, or not visible)."""
    b, hkv, rows = idx.shape[:3]
    idx = idx.long()
    listed = (idx >= 0) & (idx < last)
    if causal:
        position = torch.arange(start, start + rows, device=idx.device) + (seq_k - seq_q)
        listed &= idx <= position[:, None]
    counts = torch.zeros(b, hkv, rows, last, dtype=compute, device=idx.device)
    counts.scatter_add_(-1, torch.where(listed, idx, 0), listed.to(compute))
    return counts[:, :, None]


def _dense_chunk(q_rows, k_span, v_span, counts, scale: float):
    """Output rows [B, Hq, c, Dv] of q_rows over keys [0, span) (finite V, and K where a gradient is recorded:
    _dense_hidden), each weighted by its listing count."""
    b, hq, rows, dqk = q_rows.shape
    hkv = k_span.shape[1]
    q_rows = q_rows.reshape(b, hkv, hq // hkv, rows, dqk).to(k_span.dtype)
    # In place from the scores on (no gradient recorded): one [B, Hq, c, span] buffer besides the counts.
    scores = torch.einsum("bhgcd,bhkd->bhgck", q_rows, k_span)
    if _recording(q_rows, k_span):
        scores = (scores * scale).masked_fill(counts == 0, float("-inf"))
    else:
        scores = scores.mul_(scale).masked_fill_(counts == 0, float("-inf"))
    o = _attend(scores, v_span, "bhgck,bhkv->bhgcv", counts)
    return o.reshape(b, hq, rows, v_span.shape[-1])


def _dense_hidden(q, k, v, indices, causal: bool, dim: int, dtype, grad: bool):
    """(k, v, start) for the dense chunks, in the compute dtype: v with its NaN / Inf entries zeroed, k too
    where grad (the forward masks the scores of such keys like those of any key a row does not list), and
    the starting value of the output (dim Dv) or of dq (Dqk) in dtype: NaN in the rows listing a key whose K
    or V row holds one, 0 elsewhere (dsattn.torch_backend._hidden_keys). indices: [B, Hkv, Sq, T]."""
    b, hkv, sk = k.shape[:3]
    sq, topk = indices.shape[2:]
    compute = _compute_dtype(q)
    bad = _hidden_keys.bad_rows(k, compute) | _hidden_keys.bad_rows(v, compute)
    idx = indices.long()
    listed = (idx >= 0) & (idx < sk)
    if causal:
        listed &= idx <= (torch.arange(sq, device=idx.device) + (sk - sq))[:, None]
    hit = bad.gather(-1, torch.where(listed, idx, 0).reshape(b, hkv, sq * topk)).view(b, hkv, sq, topk) & listed
    start = _hidden_keys.nan_rows(hit.sum(-1), q.shape[1] // hkv, dim, dtype)
    kc = k.to(compute)
    if grad:
        kc = _hidden_keys.finite(kc, inplace=k.dtype != compute)  # (a copy already)
    return kc, _hidden_keys.finite(v.to(compute), inplace=v.dtype != compute), start


# ------------------------------------------------------------------------------------------ the backend
def sparse_attention(q, k, v, indices, *, causal: bool = False, scale: float | None = None,
                     chunk_size: int | None = None, strategy: str = "auto") -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], indices [B, Sq, T] or [B, Hkv, Sq, T]
    (int32/int64) -> [B, Hq, Sq, Dv] in q's dtype, computed in float32 (float64 for float64 inputs).
    strategy: "gather", "dense" or "auto" (see DENSE_WORK_PER_GATHERED_ROW)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = dqk**-0.5 if scale is None else scale
    strategy = _strategy(q, k, indices, causal, strategy)
    indices = _per_kv_head(indices, b, hkv, sq)
    if b * hq * sq * dv == 0 or indices.shape[-1] == 0 or sk == 0:
        return torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    compute = _compute_dtype(q)
    if strategy == "gather":
        out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
        starts, size = _gather_chunks(q, k, v, indices, chunk_size)
        for start in starts:
            stop = min(start + size, sq)
            k_rows, v_rows, valid, _ = _gather_rows(k, v, indices[:, :, start:stop], start, sq, causal, compute)
            out[:, :, start:stop] = _gather_chunk(q[:, :, start:stop], k_rows, v_rows, valid, scale).to(q.dtype)
        return out
    size = _dense_chunk_size(q, k, chunk_size)
    kc, vc, out = _dense_hidden(q, k, v, indices, causal, dv, q.dtype, grad=_recording(q, k, v))
    for start in range(0, sq, size):
        stop = min(start + size, sq)
        last = _dense_last(start, stop, sq, sk, causal)
        if last <= 0:
            continue
        counts = _dense_counts(indices[:, :, start:stop], start, sq, sk, last, causal, compute)
        out[:, :, start:stop].add_(_dense_chunk(q[:, :, start:stop], kc[:, :, :last], vc[:, :, :last], counts, scale))
    return out


def sparse_attention_backward(grad_out, q, k, v, indices, *, causal: bool, scale: float,
                              chunk_size: int | None = None, strategy: str = "auto"):
    """(dq, dk, dv) of sparse_attention for grad_out [B, Hq, Sq, Dv]: each query chunk recomputed under
    autograd with the forward's strategy; a listed key's gradient counts once per listing, entries that are no
    key get none. Gradients accumulate in the compute dtype and come back in the inputs' dtypes."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    strategy = _strategy(q, k, indices, causal, strategy)
    indices = _per_kv_head(indices, b, hkv, sq)
    compute = _compute_dtype(q)
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv_ = torch.zeros(v.shape, dtype=compute, device=v.device)
    if grad_out.numel() == 0 or indices.shape[-1] == 0 or sk == 0:
        return torch.zeros_like(q), dk.to(k.dtype), dv_.to(v.dtype)
    if strategy == "gather":
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)
        starts, size = _gather_chunks(q, k, v, indices, chunk_size)
        for start in starts:
            stop = min(start + size, sq)
            k_rows, v_rows, valid, flat = _gather_rows(k, v, indices[:, :, start:stop], start, sq, causal, compute)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in (q[:, :, start:stop].to(compute), k_rows, v_rows)]
                o = _gather_chunk(leaves[0], leaves[1], leaves[2], valid, scale)
                gq, gk, gv = torch.autograd.grad(o, leaves, grad_out[:, :, start:stop].to(compute))
            dq[:, :, start:stop] = gq
            rows = stop - start
            # Scatter-add: a key listed twice gets both listings' gradients; no-key entries add nothing.
            gk = gk.masked_fill(~valid[..., None], 0).reshape(b, hkv, rows * gk.shape[3], dqk)
            gv = gv.masked_fill(~valid[..., None], 0).reshape(b, hkv, rows * gv.shape[3], dv)
            dk.scatter_add_(2, flat.expand(-1, -1, -1, dqk), gk)
            dv_.scatter_add_(2, flat.expand(-1, -1, -1, dv), gv)
        return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype)
    size = _dense_chunk_size(q, k, chunk_size)
    kc, vc, dq = _dense_hidden(q, k, v, indices, causal, dqk, compute, grad=True)
    for start in range(0, sq, size):
        stop = min(start + size, sq)
        last = _dense_last(start, stop, sq, sk, causal)
        if last <= 0:
            continue
        counts = _dense_counts(indices[:, :, start:stop], start, sq, sk, last, causal, compute)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True)
                      for t in (q[:, :, start:stop].to(compute), kc[:, :, :last], vc[:, :, :last])]
            o = _dense_chunk(leaves[0], leaves[1], leaves[2], counts, scale)
            gq, gk, gv = torch.autograd.grad(o, leaves, grad_out[:, :, start:stop].to(compute))
        dq[:, :, start:stop].add_(gq)
        dk[:, :, :last].add_(gk)
        dv_[:, :, :last].add_(gv)
    return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype)
