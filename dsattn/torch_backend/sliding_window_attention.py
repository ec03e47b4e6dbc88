"""Sliding-window attention, chunked over queries (the "torch" backend).

A query chunk only looks at the keys its window can reach, so memory is O(chunk x (chunk + window)) per head,
never O(Sq x Sk) for a window much shorter than the sequence. For such windows the chunks ("blocks") of a
group go through one set of batched ops over unfold views of the keys (block_groups, attend_blocks): few,
large ops per call, which keeps the intra-op threads' fork-joins rare. The backward recomputes each chunk
under autograd and accumulates its dK / dV span: its memory is one chunk's, like the forward's. Keys outside a
row's window never enter its arithmetic, also when they hold NaN or Inf (dsattn.torch_backend._hidden_keys:
no host read, so the same code runs traced).
Semantics: SPEC and dsattn.reference.sliding_window_attention.
"""

import torch

from dsattn.torch_backend import _hidden_keys

# Scores held per chunk (elements of [B, Hq, chunk, span]), ~64 MiB in fp32; rows per chunk at most.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK, MAX_CHUNK = 64, 512


def visible_key_range(first: int, last: int, seq_q: int, seq_k: int, window: int, causal: bool) -> tuple[int, int]:
    """[lo, hi) of the keys any query row in [first, last] can see (the kernels use the same bounds)."""
    offset = seq_k - seq_q
    lo = max(0, first + offset - window + 1)
    hi = min(seq_k, (last + offset + 1) if causal else (last + offset + window))
    return lo, max(lo, hi)


def _chunk_rows(q, k, window: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    # About one window of rows per chunk (a chunk's key span is at most chunk + 2 * window: the work is
    # O(S x window), not O(S x S)), within the score budget.
    b, hq, sk = q.shape[0], q.shape[1], k.shape[2]
    chunk_size = min(MAX_CHUNK, max(MIN_CHUNK, window))
    return max(1, min(chunk_size, CHUNK_ELEMENTS // max(1, b * hq * min(sk, chunk_size + 2 * window))))


def chunks(q, k, window: int, causal: bool, chunk_size: int | None = None):
    """(start, stop, lo, hi) per query chunk that sees any key: rows [start, stop) over keys [lo, hi)."""
    sq, sk = q.shape[2], k.shape[2]
    chunk_size = _chunk_rows(q, k, window, chunk_size)
    for start in range(0, sq, chunk_size):
        stop = min(start + chunk_size, sq)
        lo, hi = visible_key_range(start, stop - 1, sq, sk, window, causal)
        if hi > lo:
            yield start, stop, lo, hi


def blocked(window: int, seq_k: int) -> bool:
    """Whether block_groups serves this window: a window well inside the keys (its blocks' fixed spans, padded
    at the sequence's start, would mostly score padding for a window as long as the keys)."""
    return 4 * window <= seq_k


def block_groups(q, k, window: int, causal: bool, chunk_size: int | None = None):
    """(start, stop, rows, blocks, seg_lo, span, lo, hi) per group of query blocks: rows [start, stop) in
    `blocks` blocks of `rows` rows (the last one padded), block m over keys [seg_lo + m rows, ... + span) (keys
    outside [0, Sk) are padding), of which [lo, hi) exist. A group's blocks go through one set of batched ops
    (attend_blocks), as many as the score budget holds: few, large ops per call, so that the fork-join of
    every intra-op parallel region is paid rarely (they stall when other work holds a core)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    rows = min(_chunk_rows(q, k, window, chunk_size), sq)
    span = rows + window - 1 if causal else rows + 2 * window - 2
    per_group = max(1, CHUNK_ELEMENTS // max(1, b * hq * rows * span))
    for start in range(0, sq, rows * per_group):
        blocks = min(per_group, -(-(sq - start) // rows))
        seg_lo = start + sk - sq - window + 1
        lo = min(sk, max(0, seg_lo))
        hi = max(lo, min(sk, seg_lo + (blocks - 1) * rows + span))
        yield start, min(sq, start + blocks * rows), rows, blocks, seg_lo, span, lo, hi


def attend_blocks(q_rows, k_keys, v_keys, sinks, rows: int, blocks: int, seg_lo: int, lo: int, span: int,
                  seq_k: int, window: int, causal: bool, scale: float):
    """A group of block_groups: q_rows [B, Hq, n, Dqk] (n <= blocks x rows) over k_keys / v_keys, the keys
    [lo, lo + len) of the group's segment (finite V, and K where a gradient is recorded: _hidden); output
    [B, Hq, n, Dv] in the compute dtype. Each block's key span is an unfold view of the zero-padded segment;
    one matmul scores every block, one multiplies V. Padding keys are masked like keys outside the window."""
    b, hq, n, dqk = q_rows.shape
    hkv, dv = k_keys.shape[1], v_keys.shape[3]
    groups = hq // hkv
    compute = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                    for t in (q_rows, k_keys, v_keys, sinks)))
    front = lo - seg_lo
    pad = (0, 0, front, (blocks - 1) * rows + span - front - k_keys.shape[2])
    k_blocks = torch.nn.functional.pad(k_keys.to(compute), pad).unfold(2, span, rows)  # [B, Hkv, blocks, Dqk, span]
    v_blocks = torch.nn.functional.pad(v_keys.to(compute), pad).unfold(2, span, rows).transpose(-1, -2)
    # GQA without repeating K/V: a block's rows of the group's q heads form one [groups * rows, Dqk] matrix.
    q_blocks = torch.nn.functional.pad(q_rows.to(compute), (0, 0, 0, blocks * rows - n))
    q_blocks = q_blocks.view(b, hkv, groups, blocks, rows, dqk).transpose(2, 3).reshape(b, hkv, blocks, groups * rows, dqk)
    scores = torch.matmul(q_blocks, k_blocks)
    scores = (scores.mul_(scale) if inplace else scores * scale).view(b, hkv, blocks, groups, rows, span)
    # Key s of block m's span minus the position of its row r: s - r - window + 1, the same in every block.
    rel = torch.arange(span, device=q_rows.device)[None, :] - torch.arange(rows, device=q_rows.device)[:, None] - window + 1
    visible = (rel > -window) & ((rel <= 0) if causal else (rel < window))
    key = seg_lo + rows * torch.arange(blocks, device=q_rows.device)[:, None] + torch.arange(span, device=q_rows.device)
    visible = (visible & ((key >= 0) & (key < seq_k))[:, None, :])[:, None]  # [blocks, 1, rows, span]
    sink_logits = None if sinks is None else sinks.to(compute).view(1, hkv, 1, groups, 1, 1)
    probs = _softmax(scores, visible, sink_logits, inplace)
    out = torch.matmul(probs.view(b, hkv, blocks, groups * rows, span), v_blocks)
    return out.view(b, hkv, blocks, groups, rows, dv).transpose(2, 3).reshape(b, hq, blocks * rows, dv)[:, :, :n]


def _softmax(scores, visible, sink_logits, inplace: bool):
    """Softmax over the last dim of scores where visible (rows with no visible key: zeros), the sink logit
    (broadcastable to scores[..., :1]) joined to the denominator."""
    scores = scores.masked_fill_(~visible, float("-inf")) if inplace else scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    if sink_logits is not None:
        row_max = torch.maximum(row_max, sink_logits.detach())
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
    probs = scores.sub_(row_max).exp_() if inplace else (scores - row_max).exp()
    denom = probs.sum(dim=-1, keepdim=True)
    if sink_logits is not None:
        denom = denom + torch.exp(sink_logits - row_max)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs.div_(denom) if inplace else probs / denom


def attend_chunk(q_rows, k_span, v_span, sinks, start: int, lo: int, seq_q: int, seq_k: int, window: int,
                 causal: bool, scale: float):
    """Output rows [start, start + rows) from q_rows [B, Hq, rows, Dqk] over keys [lo, lo + span) (finite V, and
    K where a gradient is recorded: _hidden) in the compute dtype (float32, float64 for float64 inputs). In
    place where no gradient is recorded."""
    b, hq, rows, dqk = q_rows.shape
    hkv, span, dv = k_span.shape[1], k_span.shape[2], v_span.shape[3]
    groups = hq // hkv
    compute = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                    for t in (q_rows, k_span, v_span, sinks)))
    position = torch.arange(start, start + rows, device=q_rows.device)[:, None] + (seq_k - seq_q)
    key = torch.arange(lo, lo + span, device=q_rows.device)[None, :]
    visible = (key > position - window) & ((key <= position) if causal else (key < position + window))
    # GQA without repeating K/V: the groups' rows of one kv head form one [groups * rows, D] matrix.
    scores = torch.matmul(q_rows.reshape(b, hkv, groups * rows, dqk).to(compute), k_span.to(compute).transpose(-1, -2))
    scores = (scores.mul_(scale) if inplace else scores * scale).reshape(b, hkv, groups, rows, span)
    probs = _softmax(scores, visible, None if sinks is None else sinks.to(compute).view(1, hkv, groups, 1, 1), inplace)
    return torch.matmul(probs.view(b, hkv, groups * rows, span), v_span.to(compute)).view(b, hq, rows, dv)


def first_visible_key(seq_q: int, seq_k: int, window: int) -> int:
    """The first key any row can see: the keys before it are dropped before any work (a decode row reads its
    window, not the cache); positions stay relative to the last key, so dropping them changes nothing."""
    return max(0, seq_k - seq_q - window + 1)


def _hidden(q, k, v, window: int, causal: bool, dim: int, dtype, grad: bool):
    """(k, v, start) for the chunks: v with its NaN / Inf entries zeroed, k too where grad (the forward masks
    the scores of such keys like those of any key outside a window), and the starting value of the output
    (dim Dv) or of dq (Dqk) in dtype: NaN in the rows whose window holds such a key, 0 elsewhere
    (dsattn.torch_backend._hidden_keys)."""
    sq, hq, hkv, sk = q.shape[2], q.shape[1], k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    bad = _hidden_keys.bad_rows(k, compute) | _hidden_keys.bad_rows(v, compute)
    position = torch.arange(sq, device=q.device) + (sk - sq)
    lo = (position - window + 1).clamp(0, sk)
    hi = (position + 1 if causal else position + window).clamp(0, sk)
    start = _hidden_keys.nan_rows(_hidden_keys.range_counts(bad, lo, hi), hq // hkv, dim, dtype)
    return (_hidden_keys.finite(k) if grad else k), _hidden_keys.finite(v), start


def sliding_window_attention(q, k, v, window: int, *, causal: bool = True, scale: float | None = None,
                             sinks=None, chunk_size: int | None = None):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], Hq % Hkv == 0 -> [B, Hq, Sq, Dv] in q's
    dtype; rows that see no key are zeros."""
    b, hq, sq, dqk = q.shape
    scale = dqk**-0.5 if scale is None else scale
    if b * hq * sq * v.shape[3] == 0:
        return torch.zeros(b, hq, sq, v.shape[3], dtype=q.dtype, device=q.device)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    first = first_visible_key(sq, k.shape[2], window)
    k, v = k[:, :, first:], v[:, :, first:]
    k, v, out = _hidden(q, k, v, window, causal, v.shape[3], q.dtype, grad=recording)
    if blocked(window, k.shape[2]):
        for start, stop, rows, blocks, seg_lo, span, lo, hi in block_groups(q, k, window, causal, chunk_size):
            out[:, :, start:stop].add_(attend_blocks(q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi], sinks, rows,
                                                     blocks, seg_lo, lo, span, k.shape[2], window, causal, scale))
        return out
    for start, stop, lo, hi in chunks(q, k, window, causal, chunk_size):
        out[:, :, start:stop].add_(attend_chunk(q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi], sinks, start, lo,
                                                sq, k.shape[2], window, causal, scale))
    return out


def sliding_window_attention_backward(grad_out, q, k, v, window: int, *, causal: bool = True, scale: float,
                                      sinks=None, chunk_size: int | None = None):
    """(dq, dk, dv, dsinks) of sliding_window_attention for grad_out [B, Hq, Sq, Dv]; dsinks None without
    sinks. Each chunk is recomputed under autograd (O(chunk x span) memory); gradients accumulate in the
    compute dtype and come back in the inputs' dtypes."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dk = torch.zeros(k.shape, dtype=compute, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute, device=v.device)
    dsinks = None if sinks is None else torch.zeros(sinks.shape, dtype=compute, device=sinks.device)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dsinks is None else dsinks.to(sinks.dtype))
    first = first_visible_key(q.shape[2], k.shape[2], window)
    dk_visible, dv_visible = dk[:, :, first:], dv[:, :, first:]  # views: the keys before first get zeros
    k, v = k[:, :, first:], v[:, :, first:]
    k, v, dq = _hidden(q, k, v, window, causal, q.shape[3], compute, grad=True)  # dq: the NaN rows
    sq, sk = q.shape[2], k.shape[2]
    if blocked(window, sk):
        pieces = [(start, stop, lo, hi, (rows, blocks, seg_lo, lo, span, sk, window, causal, scale))
                  for start, stop, rows, blocks, seg_lo, span, lo, hi in block_groups(q, k, window, causal, chunk_size)]
        attend = attend_blocks
    else:
        pieces = [(start, stop, lo, hi, (start, lo, sq, sk, window, causal, scale))
                  for start, stop, lo, hi in chunks(q, k, window, causal, chunk_size)]
        attend = attend_chunk
    for start, stop, lo, hi, args in pieces:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi])]
            sink_leaf = None if sinks is None else sinks.detach().requires_grad_(True)
            o = attend(*leaves, sink_leaf, *args)
            grads = torch.autograd.grad(o, leaves + ([sink_leaf] if sink_leaf is not None else []),
                                        grad_out[:, :, start:stop].to(compute))
        dq[:, :, start:stop].add_(grads[0])
        dk_visible[:, :, lo:hi].add_(grads[1])
        dv_visible[:, :, lo:hi].add_(grads[2])
        if dsinks is not None:
            dsinks.add_(grads[3])
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dsinks is None else dsinks.to(sinks.dtype))


def sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, window: int, *, causal: bool = True,
                                    scale: float | None = None, sinks=None):
    """Packed sequences [total, H, D] (sequence s: rows cu_seqlens[s]:cu_seqlens[s+1]), each through
    sliding_window_attention as a [1, H, S, D] view (no copy). Reads the offsets on the host."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        o = sliding_window_attention(_bhsd(q[q0:q1]), _bhsd(k[k0:k1]), _bhsd(v[k0:k1]), window, causal=causal,
                                     scale=scale, sinks=sinks)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def sliding_window_attention_varlen_backward(grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, window: int, *,
                                             causal: bool = True, scale: float, sinks=None):
    """(dq, dk, dv, dsinks) of the varlen op, sequence by sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsinks = None if sinks is None else torch.zeros_like(sinks)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        g = sliding_window_attention_backward(_bhsd(grad_out[q0:q1]), _bhsd(q[q0:q1]), _bhsd(k[k0:k1]),
                                              _bhsd(v[k0:k1]), window, causal=causal, scale=scale, sinks=sinks)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (t[0].transpose(0, 1) for t in g[:3])
        if dsinks is not None:
            dsinks += g[3]
    return dq, dk, dv, dsinks


def _bhsd(t):
    return t.transpose(0, 1)[None]  # [S, H, D] -> [1, H, S, D], a view


def _sequences(cu_seqlens_q, cu_seqlens_k):
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(starts_q) - 1):
        if starts_q[s + 1] > starts_q[s]:
            yield starts_q[s], starts_q[s + 1], starts_k[s], starts_k[s + 1]
