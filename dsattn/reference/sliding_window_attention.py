"""Sliding-window attention, the oracle: dense scores and an explicit visibility mask, written for clarity
(O(Sq x Sk) memory: tests only). The tuned chunked code is the "torch" backend (dsattn.torch_backend).

Visibility (SPEC): query i sits at position p = i + Sk - Sq; with causal=True key j is visible iff
p - window < j <= p, so window >= Sk is full causal attention. causal=False is the symmetric window
|p - j| < window. `sinks` ([Hq] logits, gpt-oss / DeepSeek-V4 `s_aux`) join every row's softmax denominator
as one extra logit that has no value. A row that sees no key outputs zeros; keys a row cannot see never
enter its arithmetic (a NaN there stays out).
"""

import torch


def visible_mask(seq_q: int, seq_k: int, window: int, causal: bool, device=None) -> torch.Tensor:
    """bool [Sq, Sk]: key j visible to query i."""
    position = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    key = torch.arange(seq_k, device=device)[None, :]
    upper = (key <= position) if causal else (key < position + window)
    return (key > position - window) & upper


def masked_softmax_attention(scores, visible, v, sink_logits=None):
    """softmax over the visible scores [..., Sq, Sk] (plus an optional sink logit [..., 1, 1] in the
    denominator) times v [..., Sk, Dv]; invisible keys contribute nothing, rows with none give zeros."""
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink_logits is not None:
        scores = torch.cat([scores, sink_logits.expand(*scores.shape[:-1], 1)], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    if sink_logits is not None:
        weights = weights[..., :-1]
    # Sum only the visible keys' values: 0 * NaN would leak an invisible NaN.
    terms = torch.where(visible[..., None], weights[..., None] * v[..., None, :, :], torch.zeros((), dtype=v.dtype))
    return terms.sum(dim=-2)


def sliding_window_attention(q, k, v, window: int, *, causal: bool = True, scale: float | None = None,
                             sinks=None) -> torch.Tensor:
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv], Hq % Hkv == 0 -> [B, Hq, Sq, Dv] in q's
    dtype, computed in float32 (float64 for float64 inputs)."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.to(compute).repeat_interleave(hq // hkv, dim=1)
    v = v.to(compute).repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    sink_logits = None if sinks is None else sinks.to(compute).view(1, hq, 1, 1)
    out = masked_softmax_attention(scores, visible_mask(sq, sk, window, causal, q.device), v, sink_logits)
    return out.to(q.dtype)


def sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    window: int, *, causal: bool = True, scale: float | None = None,
                                    sinks=None) -> torch.Tensor:
    """Packed sequences: q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv]; sequence s owns
    rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and cu_seqlens_k[s]:cu_seqlens_k[s+1] of k/v, its queries at
    the end of its keys. max_seqlen_* are the kernels' grid hints, unused here."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        if cq[s + 1] > cq[s]:
            o = sliding_window_attention(q[cq[s]:cq[s + 1]].transpose(0, 1)[None],
                                         k[ck[s]:ck[s + 1]].transpose(0, 1)[None],
                                         v[ck[s]:ck[s + 1]].transpose(0, 1)[None],
                                         window, causal=causal, scale=scale, sinks=sinks)
            out[cq[s]:cq[s + 1]] = o[0].transpose(0, 1)
    return out
