"""HybridAttention: dsattn.hybrid_attention as an nn.Module (q, k, v [B, H, S, D]).

With learnable feature maps (a dsattn.nn.linear_attention.QKFeatureMaps as `feature_map`) the far keys' weights
are maps.q(q_i) . maps.k(k_j) while the exact keys keep the raw scores, which the op (one q, one k, one named
map) cannot express; learned_hybrid_attention composes the same formula from dsattn.linear_attention (far
keys, O(S) state) and the exact keys gathered per query (O(S x (prefix + window)) memory)."""

import torch
from torch import nn

from dsattn.ops.hybrid_attention import hybrid_attention
from dsattn.ops.linear_attention import linear_attention


def learned_hybrid_attention(q, k, v, maps, *, prefix: int = 2048, window: int = 0, scale: float | None = None):
    """dsattn.hybrid_attention's formula (dsattn.reference.hybrid_attention) with phi(q_i).phi(k_j) =
    maps.q(q_i) . maps.k(k_j) on the far keys: q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv]
    -> [B, Hq, Sq, Dv] in q's dtype. Differentiable by autograd (q, k, v and the maps' parameters)."""
    b, hq, sq, _ = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if sq > sk:
        raise ValueError(f"learned_hybrid_attention: Sq ({sq}) > Sk ({sk})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    dev = q.device

    # Far keys prefix <= j <= p - window through causal linear attention on keys shifted `window` places later
    # (zero features before the prefix add nothing), values extended by a ones column for the normalizer.
    fk = maps.k(k).to(dtype)
    va = torch.cat([v.to(dtype), v.new_ones(b, hkv, sk, 1, dtype=dtype)], dim=-1)
    keep = (torch.arange(sk, device=dev) >= prefix).to(dtype)[:, None]
    fk, va = fk * keep, va * keep
    shift = min(window, sk)
    if shift:
        fk = torch.cat([fk.new_zeros(b, hkv, shift, fk.shape[-1]), fk[:, :, :sk - shift]], dim=2)
        va = torch.cat([va.new_zeros(b, hkv, shift, dv + 1), va[:, :, :sk - shift]], dim=2)
    far = linear_attention(maps.q(q).to(dtype), fk, va, feature_map="identity", normalize=False)  # [B, Hq, Sq, Dv+1]

    # Exact keys: the first `prefix` keys and the last `window` ones of each query (p = i + Sk - Sq), gathered.
    group = hq // hkv
    kf = k.to(dtype).repeat_interleave(group, dim=1)
    vf = v.to(dtype).repeat_interleave(group, dim=1)
    pos = torch.arange(sq, device=dev)[:, None] + (sk - sq)
    n_pre = min(prefix, sk)
    cols_pre = torch.arange(n_pre, device=dev)[None, :].expand(sq, n_pre)
    cols_win = pos - window + 1 + torch.arange(window, device=dev)[None, :]
    cols = torch.cat([cols_pre, cols_win], dim=1)  # [Sq, prefix + window]
    valid = (cols >= 0) & (cols <= pos)
    valid[:, n_pre:] &= cols_win >= n_pre  # a key in the prefix is counted once
    idx = cols.clamp(0, max(sk - 1, 0))
    kg = kf[:, :, idx]  # [B, Hq, Sq, E, Dqk]
    vg = vf[:, :, idx]
    s = torch.einsum("bhsd,bhsed->bhse", q.to(dtype), kg) * scale
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no exact key: m unused
    w = torch.where(valid, torch.exp(s - m), torch.zeros_like(s))
    num = torch.einsum("bhse,bhsed->bhsd", w, torch.where(valid[..., None], vg, torch.zeros_like(vg))) + far[..., :dv]
    den = w.sum(dim=-1, keepdim=True) + far[..., dv:]
    out = torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))
    return out.to(q.dtype)


class HybridAttention(nn.Module):
    """feature_map: a name (dsattn.hybrid_attention's maps) or a QKFeatureMaps module (learnable; then
    learned_hybrid_attention runs)."""

    def __init__(self, *, prefix: int = 2048, window: int = 0, feature_map="elu", scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.prefix, self.window, self.feature_map, self.scale, self.backend = prefix, window, feature_map, scale, backend

    def forward(self, q, k, v):
        if isinstance(self.feature_map, nn.Module):
            return learned_hybrid_attention(q, k, v, self.feature_map, prefix=self.prefix, window=self.window,
                                            scale=self.scale)
        return hybrid_attention(q, k, v, prefix=self.prefix, window=self.window, feature_map=self.feature_map,
                                scale=self.scale, backend=self.backend)

    def extra_repr(self):
        fm = "learned" if isinstance(self.feature_map, nn.Module) else repr(self.feature_map)
        return f"prefix={self.prefix}, window={self.window}, feature_map={fm}, backend={self.backend!r}"
