"""Hybrid (layered) attention, plain PyTorch: exact softmax on the first `prefix` keys and the last `window`
keys of each query, linear (kernelized) attention over the other visible keys, one shared normalizer.

For query i at position p = i + Sk - Sq (causal: keys j <= p are visible):
    exact keys  E_i = {j <= p : j < prefix  or  p - window < j}
    far keys    F_i = {j : prefix <= j <= p - window}
    o_i = (sum_E e^(s_ij - m_i) v_j + sum_F phi(q_i).phi(k_j) v_j) / (sum_E e^(s_ij - m_i) + sum_F phi(q_i).phi(k_j))
with s_ij = scale * q_i.k_j and m_i = max_E s_ij.

Edge cases (the Triton kernel does the same):
- E_i empty (prefix = window = 0, or a query past the prefix with window 0): m_i has no value and is not
  needed; the row is pure normalized linear attention sum_F phi.phi v / sum_F phi.phi.
- Denominator 0 (no visible key at all, i.e. Sq > Sk rows before the first key, or F_i-only rows whose
  phi(q).phi(k) sum to exactly 0, e.g. relu features with no overlap): the row is 0, never NaN. With exact
  keys the denominator is >= 1 (the max term is e^0) for the non-negative feature maps; with "identity" the
  far products may be negative and the caller owns the sign of the denominator.
- prefix >= Sk (or window > every position): every visible key is exact, so this is causal softmax attention.

No O(S^2) tensor: queries are processed in chunks; the exact part scores only the prefix keys and the window
band of the chunk, and the far part is causal linear attention with a lag of `window` keys, carried as a
running fp32/fp64 state (sum phi(k)^T v, sum phi(k)) over the keys j < prefix-of-chunk-bound plus a small
intra-chunk masked product.
"""

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map

QUERY_CHUNK = 128


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hybrid_attention(q, k, v, *, prefix=2048, window=0, feature_map="elu", scale=None, chunk=QUERY_CHUNK):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype.
    Inputs are assumed validated (dsattn.ops.hybrid_attention does that)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = dqk**-0.5 if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    group = hq // hkv
    # GQA: repeat k/v heads (O(S * D) memory, the reference favours clarity).
    kf = k.to(cdt).repeat_interleave(group, dim=1)
    vf = v.to(cdt).repeat_interleave(group, dim=1)
    qf = q.to(cdt)
    phi_q = apply_feature_map(qf, feature_map)
    phi_k = apply_feature_map(kf, feature_map)

    out = torch.empty(b, hq, sq, dv, dtype=cdt, device=q.device)
    # Running far state over keys [prefix, state_end): phi(k)^T v and phi(k).
    state_kv = torch.zeros(b, hq, dqk, dv, dtype=cdt, device=q.device)
    state_k = torch.zeros(b, hq, dqk, dtype=cdt, device=q.device)
    state_end = prefix
    keys = torch.arange(sk, device=q.device)
    for i0 in range(0, sq, chunk):
        i1 = min(i0 + chunk, sq)
        pos = torch.arange(i0, i1, device=q.device) + (sk - sq)  # [C] absolute query positions
        p_first, p_last = i0 + sk - sq, i1 - 1 + sk - sq
        qc, phi_qc = qf[:, :, i0:i1], phi_q[:, :, i0:i1]

        # Exact part: the prefix keys and this chunk's window band (disjoint index ranges).
        n_prefix = max(0, min(prefix, sk, p_last + 1))
        band_lo = max(prefix, p_first - window + 1, 0)
        band_hi = min(p_last + 1, sk) if window > 0 else band_lo
        idx = torch.cat([keys[:n_prefix], keys[band_lo:max(band_lo, band_hi)]])
        scores = scale * torch.einsum("bhid,bhjd->bhij", qc, kf[:, :, idx])
        j, p = idx[None, :], pos[:, None]
        exact = (j <= p) & ((j < prefix) | (j > p - window))  # [C, n]
        scores = scores.masked_fill(~exact, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True) if idx.numel() else scores.new_full((b, hq, i1 - i0, 1), float("-inf"))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no exact key: m_i unused, take 0
        weights = torch.exp(scores - m)  # exp(-inf) = 0 on masked keys
        num = torch.einsum("bhij,bhjd->bhid", weights, vf[:, :, idx])
        den = weights.sum(dim=-1)

        # Far part: keys prefix <= j <= p - window. Advance the state to the chunk's first bound, then add the
        # keys between that bound and each query's own bound with a small masked product.
        first_hi = p_first - window + 1  # exclusive far bound of the chunk's first query
        new_end = max(state_end, min(first_hi, sk))
        if new_end > state_end:
            state_kv += torch.einsum("bhjd,bhje->bhde", phi_k[:, :, state_end:new_end], vf[:, :, state_end:new_end])
            state_k += phi_k[:, :, state_end:new_end].sum(dim=2)
            state_end = new_end
        num = num + torch.einsum("bhid,bhde->bhie", phi_qc, state_kv)
        den = den + torch.einsum("bhid,bhd->bhi", phi_qc, state_k)
        tail_lo, tail_hi = state_end, min(p_last - window + 1, sk)
        if tail_hi > tail_lo:
            jt = keys[tail_lo:tail_hi]
            a = torch.einsum("bhid,bhjd->bhij", phi_qc, phi_k[:, :, tail_lo:tail_hi])
            a = a * (jt[None, :] <= pos[:, None] - window)  # jt >= state_end >= prefix already
            num = num + torch.einsum("bhij,bhjd->bhid", a, vf[:, :, tail_lo:tail_hi])
            den = den + a.sum(dim=-1)

        safe = torch.where(den == 0, torch.ones_like(den), den)
        out[:, :, i0:i1] = torch.where((den == 0)[..., None], torch.zeros_like(num), num / safe[..., None])
    return out.to(q.dtype)
