"""Hybrid (layered) attention, the oracle: dense scores and explicit exact / far masks, written for clarity
(O(Sq x Sk) memory: tests only). The tuned chunked code is the "torch" backend
(dsattn.torch_backend.hybrid_attention).

Exact softmax on the first `prefix` keys and the last `window` keys of each query, linear (kernelized)
attention over the other visible keys, one shared normalizer. For query i at position p = i + Sk - Sq
(causal: keys j <= p are visible):
    exact keys  E_i = {j <= p : j < prefix  or  p - window < j}
    far keys    F_i = {j : prefix <= j <= p - window}
    o_i = (sum_E e^(s_ij - m_i) v_j + sum_F phi(q_i).phi(k_j) v_j) / (sum_E e^(s_ij - m_i) + sum_F phi(q_i).phi(k_j))
with s_ij = scale * q_i.k_j and m_i = max_E s_ij.

Edge cases (every backend does the same):
- E_i empty (prefix = window = 0, or a query past the prefix with window 0): m_i has no value and is not
  needed; the row is pure normalized linear attention sum_F phi.phi v / sum_F phi.phi.
- Denominator 0 (no visible key at all, i.e. Sq > Sk rows before the first key, or F_i-only rows whose
  phi(q).phi(k) sum to exactly 0, e.g. relu features with no overlap): the row is 0, never NaN. With exact
  keys the denominator is >= 1 (the max term is e^0) for the non-negative feature maps; with "identity" the
  far products may be negative and the caller owns the sign of the denominator.
- prefix >= Sk (or window > every position): every visible key is exact, so this is causal softmax attention.
Keys a row cannot see (j > p) never enter its arithmetic (a NaN there stays out).
"""

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map


def hybrid_attention(q, k, v, *, prefix=2048, window=0, feature_map="elu", scale=None):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype, computed
    in float32 (float64 for float64 inputs)."""
    hq, hkv, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(dtype)
    kf = k.to(dtype).repeat_interleave(hq // hkv, dim=1)
    vf = v.to(dtype).repeat_interleave(hq // hkv, dim=1)
    zero = torch.zeros((), dtype=dtype, device=q.device)

    p = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    exact = (j <= p) & ((j < prefix) | (j > p - window))  # [Sq, Sk]
    far = (j >= prefix) & (j <= p - window)

    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~exact, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True) if sk else scores.new_zeros(*scores.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, zero)  # no exact key: m_i unused
    w_exact = torch.where(exact, torch.exp(scores - m), zero)
    w_far = torch.where(far, apply_feature_map(qf, feature_map) @ apply_feature_map(kf, feature_map).transpose(-1, -2),
                        zero)
    weights = w_exact + w_far  # E and F are disjoint
    visible = exact | far
    # Sum only the visible keys' values: 0 * NaN would leak an invisible NaN.
    num = torch.where(visible[..., None], weights[..., None] * vf[:, :, None], zero).sum(dim=-2)
    den = weights.sum(dim=-1, keepdim=True)
    out = torch.where(den == 0, zero, num / torch.where(den == 0, torch.ones_like(den), den))
    return out.to(q.dtype)
