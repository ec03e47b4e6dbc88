"""Hybrid attention, chunked over queries (the "torch" backend). Semantics: SPEC and
dsattn.reference.hybrid_attention.

Per chunk of rows, the exact part scores only the prefix keys and the chunk's window band; the far part is
causal linear attention with a lag of `window` keys: a running state (sum phi(k)^T v, sum phi(k)) over the
far keys below the chunk's first row's bound, plus the few far keys between that bound and each row's own
as a small masked phi(q) phi(k)^T product. Memory O(chunk x (prefix + chunk + window)), never [Sq, Sk].

The chunks share only the state, so the backward recomputes one chunk at a time under autograd (the states
each chunk read are recomputed and kept: O(Sq / chunk x Dqk x Dv)) and walks them in reverse, carrying the
state's cotangent back to the keys that entered it.
"""

import dataclasses

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map

QUERY_CHUNK = 128


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows [i0, i1); exact keys [0, n_prefix) and [band_lo, band_hi); the state covers far keys
    [prefix, state_hi) after absorbing [absorb_lo, state_hi); tail far keys [state_hi, tail_hi)."""

    i0: int
    i1: int
    n_prefix: int
    band_lo: int
    band_hi: int
    absorb_lo: int
    state_hi: int
    tail_hi: int


def plan(sq: int, sk: int, prefix: int, window: int, chunk: int = QUERY_CHUNK):
    """The query chunks and the key ranges each reads (the Triton kernel uses the same bounds)."""
    state_hi = min(prefix, sk)
    for i0 in range(0, sq, chunk):
        i1 = min(i0 + chunk, sq)
        p_first, p_last = i0 + sk - sq, i1 - 1 + sk - sq
        n_prefix = max(0, min(prefix, sk, p_last + 1))
        band_lo = min(max(prefix, p_first - window + 1, 0), sk)
        band_hi = max(band_lo, min(p_last + 1, sk)) if window > 0 else band_lo
        absorb_lo = state_hi
        state_hi = max(state_hi, min(p_first - window + 1, sk))  # far keys every row of the chunk sees
        tail_hi = max(state_hi, min(p_last - window + 1, sk))
        yield Chunk(i0, i1, n_prefix, band_lo, band_hi, absorb_lo, state_hi, tail_hi)


def absorb(k_r, v_r, feature_map: str, dtype: torch.dtype):
    """(phi(k)^T v [B, Hkv, Dqk, Dv], sum phi(k) [B, Hkv, Dqk]) of keys k_r/v_r [B, Hkv, n, D]."""
    fk = apply_feature_map(k_r.to(dtype), feature_map)
    return fk.transpose(-1, -2) @ v_r.to(dtype), fk.sum(dim=2)


def attend_chunk(q_c, k_exact, v_exact, exact_keys, k_tail, v_tail, tail_lo: int, state_kv, state_k, c: Chunk,
                 sq: int, sk: int, prefix: int, window: int, feature_map: str, scale: float):
    """Output rows c.i0 .. c.i1 (q_c [B, Hq, C, Dqk]) in the compute dtype of the state. k_exact/v_exact
    [B, Hkv, n, D] are the keys at positions exact_keys [n]; k_tail/v_tail the far keys from tail_lo on."""
    b, hq, rows, dqk = q_c.shape
    hkv, dtype = state_kv.shape[1], state_kv.dtype
    groups = hq // hkv
    zero = torch.zeros((), dtype=dtype, device=q_c.device)
    qf = q_c.to(dtype).reshape(b, hkv, groups * rows, dqk)  # GQA without repeating K/V
    pos = (torch.arange(c.i0, c.i1, device=q_c.device) + (sk - sq))[:, None]

    # Exact keys: softmax weights e^(s - m) with m the max exact score of the row (not detached: the far
    # terms are not scaled by e^-m, so m is part of the output).
    j = exact_keys[None, :]
    exact = (j <= pos) & ((j < prefix) | (j > pos - window))
    scores = (qf @ k_exact.to(dtype).transpose(-1, -2) * scale).view(b, hkv, groups, rows, -1)
    scores = scores.masked_fill(~exact, float("-inf"))
    if exact_keys.numel():
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, zero)  # no exact key: m is unused
    else:
        m = torch.zeros(b, hkv, groups, rows, 1, dtype=dtype, device=q_c.device)
    weights = torch.exp(scores - m).view(b, hkv, groups * rows, -1)
    num = weights @ v_exact.to(dtype)
    den = weights.sum(dim=-1, keepdim=True)

    # Far keys: the state, then the tail keys up to each row's own bound.
    fq = apply_feature_map(qf, feature_map)
    num = num + fq @ state_kv
    den = den + fq @ state_k[..., None]
    if k_tail.shape[2]:
        jt = torch.arange(tail_lo, tail_lo + k_tail.shape[2], device=q_c.device)[None, :]
        a = (fq @ apply_feature_map(k_tail.to(dtype), feature_map).transpose(-1, -2)).view(b, hkv, groups, rows, -1)
        a = torch.where(jt <= pos - window, a, zero).view(b, hkv, groups * rows, -1)  # tail keys >= prefix
        num = num + a @ v_tail.to(dtype)
        den = den + a.sum(dim=-1, keepdim=True)
    safe = torch.where(den == 0, torch.ones_like(den), den)
    out = torch.where(den == 0, zero, num / safe)  # no visible key (or far terms summing to 0): zeros
    return out.view(b, hq, rows, -1)


def _exact_keys(c: Chunk, device):
    return torch.cat([torch.arange(c.n_prefix, device=device), torch.arange(c.band_lo, c.band_hi, device=device)])


def _gather(t, c: Chunk):
    """t's exact keys of chunk c: the prefix and the band, two slices (one copy only when both are there)."""
    if c.band_hi == c.band_lo:
        return t[:, :, : c.n_prefix]
    if c.n_prefix == 0:
        return t[:, :, c.band_lo : c.band_hi]
    return torch.cat([t[:, :, : c.n_prefix], t[:, :, c.band_lo : c.band_hi]], dim=2)


def hybrid_attention(q, k, v, *, prefix: int, window: int, feature_map: str, scale: float, chunk: int = QUERY_CHUNK):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    state_kv = torch.zeros(b, hkv, dqk, dv, dtype=dtype, device=q.device)
    state_k = torch.zeros(b, hkv, dqk, dtype=dtype, device=q.device)
    for c in plan(sq, sk, prefix, window, chunk):
        if c.state_hi > c.absorb_lo:
            d_kv, d_k = absorb(k[:, :, c.absorb_lo : c.state_hi], v[:, :, c.absorb_lo : c.state_hi], feature_map, dtype)
            state_kv, state_k = state_kv + d_kv, state_k + d_k
        o = attend_chunk(q[:, :, c.i0 : c.i1], _gather(k, c), _gather(v, c), _exact_keys(c, q.device),
                         k[:, :, c.state_hi : c.tail_hi], v[:, :, c.state_hi : c.tail_hi], c.state_hi, state_kv,
                         state_k, c, sq, sk, prefix, window, feature_map, scale)
        out[:, :, c.i0 : c.i1] = o.to(q.dtype)
    return out


def hybrid_attention_backward(grad_out, q, k, v, *, prefix: int, window: int, feature_map: str, scale: float,
                              chunk: int = QUERY_CHUNK):
    """(dq, dk, dv) of hybrid_attention for grad_out [B, Hq, Sq, Dv], in the inputs' dtypes."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    chunks = list(plan(sq, sk, prefix, window, chunk))
    states = []
    with torch.no_grad():
        state_kv = torch.zeros(b, hkv, dqk, dv, dtype=dtype, device=q.device)
        state_k = torch.zeros(b, hkv, dqk, dtype=dtype, device=q.device)
        for c in chunks:
            if c.state_hi > c.absorb_lo:
                d_kv, d_k = absorb(k[:, :, c.absorb_lo : c.state_hi], v[:, :, c.absorb_lo : c.state_hi], feature_map,
                                   dtype)
                state_kv, state_k = state_kv + d_kv, state_k + d_k
            states.append((state_kv, state_k))
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv_ = torch.zeros(v.shape, dtype=dtype, device=v.device)
    # Cotangent of the state summed over this and every later chunk: what the keys absorbed here receive.
    g_kv = torch.zeros(b, hkv, dqk, dv, dtype=dtype, device=q.device)
    g_k = torch.zeros(b, hkv, dqk, dtype=dtype, device=q.device)

    def leaf(t):
        return t.detach().to(dtype).requires_grad_(True)

    for c, (s_kv, s_k) in zip(reversed(chunks), reversed(states)):
        with torch.enable_grad():
            q_c = leaf(q[:, :, c.i0 : c.i1])
            k_pre, v_pre = leaf(k[:, :, : c.n_prefix]), leaf(v[:, :, : c.n_prefix])
            k_band, v_band = leaf(k[:, :, c.band_lo : c.band_hi]), leaf(v[:, :, c.band_lo : c.band_hi])
            k_tail, v_tail = leaf(k[:, :, c.state_hi : c.tail_hi]), leaf(v[:, :, c.state_hi : c.tail_hi])
            s_kv_leaf, s_k_leaf = leaf(s_kv), leaf(s_k)
            o = attend_chunk(q_c, torch.cat([k_pre, k_band], dim=2), torch.cat([v_pre, v_band], dim=2),
                             _exact_keys(c, q.device), k_tail, v_tail, c.state_hi, s_kv_leaf, s_k_leaf, c, sq, sk,
                             prefix, window, feature_map, scale)
            grads = torch.autograd.grad(o, (q_c, k_pre, v_pre, k_band, v_band, k_tail, v_tail, s_kv_leaf, s_k_leaf),
                                        grad_out[:, :, c.i0 : c.i1].to(dtype), allow_unused=True,
                                        materialize_grads=True)
        dq[:, :, c.i0 : c.i1] += grads[0]
        dk[:, :, : c.n_prefix] += grads[1]
        dv_[:, :, : c.n_prefix] += grads[2]
        dk[:, :, c.band_lo : c.band_hi] += grads[3]
        dv_[:, :, c.band_lo : c.band_hi] += grads[4]
        dk[:, :, c.state_hi : c.tail_hi] += grads[5]
        dv_[:, :, c.state_hi : c.tail_hi] += grads[6]
        g_kv, g_k = g_kv + grads[7], g_k + grads[8]
        if c.state_hi > c.absorb_lo:
            with torch.enable_grad():
                k_r, v_r = leaf(k[:, :, c.absorb_lo : c.state_hi]), leaf(v[:, :, c.absorb_lo : c.state_hi])
                gk, gv = torch.autograd.grad(absorb(k_r, v_r, feature_map, dtype), (k_r, v_r), (g_kv, g_k))
            dk[:, :, c.absorb_lo : c.state_hi] += gk
            dv_[:, :, c.absorb_lo : c.state_hi] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype)
