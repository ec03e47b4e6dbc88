"""Sliding-window attention in plain PyTorch (the oracle and the "torch" backend).

Visibility (SPEC): query i sits at position p = i + Sk - Sq; with causal=True key j is visible iff
p - window < j <= p, so window >= Sk is full causal attention. causal=False is the symmetric window
|p - j| < window. `sinks` ([Hq] logits, gpt-oss / DeepSeek-V4 `s_aux`) join every row's softmax denominator
as one extra logit that has no value: out = sum_j e^(s_j - m) v_j / (sum_j e^(s_j - m) + e^(sink - m)).
A row that sees no key (Sq > Sk, or an empty varlen sequence) outputs zeros.

The queries are processed in chunks; a chunk only looks at the keys its window can reach, so memory is
O(chunk x (chunk + window)) per head, never O(Sq x Sk) for a window much shorter than the sequence.
"""

import torch

# Scores held per chunk (elements of [B, Hq, chunk, span]), ~64 MiB in fp32; rows per chunk at most.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK, MAX_CHUNK = 64, 512


def visible_key_range(first: int, last: int, seq_q: int, seq_k: int, window: int, causal: bool) -> tuple[int, int]:
    """[lo, hi) of the keys any query row in [first, last] can see (the kernels use the same bounds)."""
    offset = seq_k - seq_q
    lo = max(0, first + offset - window + 1)
    hi = min(seq_k, (last + offset + 1) if causal else (last + offset + window))
    return lo, max(lo, hi)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], Hq % Hkv == 0 -> [B, Hq, Sq, Dv] in q's
    dtype. Computes in float32 (float64 for float64 inputs); GQA by viewing q as [B, Hkv, groups, Sq, D]
    (K/V are never repeated)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    scale = dqk**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    sink_logits = None if sinks is None else sinks.to(compute).view(1, hkv, groups, 1, 1)
    if chunk_size is None:
        # About one window of rows per chunk (a chunk's key span is at most chunk + 2 * window: the work is
        # O(S x window), not O(S x S)), within the score budget.
        chunk_size = min(MAX_CHUNK, max(MIN_CHUNK, window))
        chunk_size = max(1, min(chunk_size, CHUNK_ELEMENTS // max(1, b * hq * min(sk, chunk_size + 2 * window))))
    for start in range(0, sq, chunk_size):
        stop = min(start + chunk_size, sq)
        rows = stop - start
        lo, hi = visible_key_range(start, stop - 1, sq, sk, window, causal)
        if hi <= lo:
            continue  # no key visible to any row of the chunk: zeros (already there)
        # GQA without repeating K/V: the groups' rows of one kv head form one [groups * rows, D] matrix.
        q_rows = q[:, :, start:stop].reshape(b, hkv, groups * rows, dqk).to(compute)
        k_span = k[:, :, lo:hi].to(compute)
        v_span = v[:, :, lo:hi].to(compute)
        scores = torch.matmul(q_rows, k_span.transpose(-1, -2)).mul_(scale).view(b, hkv, groups, rows, hi - lo)
        position = torch.arange(start, stop, device=q.device)[:, None] + (sk - sq)
        key = torch.arange(lo, hi, device=q.device)[None, :]
        visible = (key > position - window) & ((key <= position) if causal else (key < position + window))
        scores.masked_fill_(~visible, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        if sink_logits is not None:
            row_max = torch.maximum(row_max, sink_logits)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # rows with no key
        probs = scores.sub_(row_max).exp_()
        denom = probs.sum(dim=-1, keepdim=True)
        if sink_logits is not None:
            denom = denom + torch.exp(sink_logits - row_max)
        probs.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        o = torch.matmul(probs.view(b, hkv, groups * rows, hi - lo), v_span)
        out[:, :, start:stop] = o.view(b, hq, rows, dv).to(q.dtype)
    return out


def sliding_window_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    window: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed sequences: q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv]; sequence s owns
    rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and cu_seqlens_k[s]:cu_seqlens_k[s+1] of k/v, and its queries
    sit at the end of its keys (query i at position i + Sk_s - Sq_s). Returns [total_q, Hq, Dv] in q's dtype.
    max_seqlen_* are hints for the kernels; the reference does not need them."""
    total_q, hq, _ = q.shape
    out = torch.zeros(total_q, hq, v.shape[2], dtype=q.dtype, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[s], starts_q[s + 1], starts_k[s], starts_k[s + 1]
        if q1 == q0:
            continue
        # [S, H, D] -> [1, H, S, D] views: no copy.
        o = sliding_window_attention(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None],
            window, causal=causal, scale=scale, sinks=sinks,
        )
        out[q0:q1] = o[0].transpose(0, 1)
    return out
