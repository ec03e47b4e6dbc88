"""LinearAttention: dsattn.linear_attention as an nn.Module (q, k, v [B, H, S, D]); pass state= to carry the
LinearAttentionState (S, z and, for "exp", its shift m) across calls (decode).

Learnable feature maps (Hedgehog, Zhang et al. 2024; used by LoLCATs for linearizing pretrained models):
QKFeatureMaps holds one HedgehogFeatureMap for the queries and one for the keys; with it as `feature_map`,
LinearAttention maps q and k itself and runs dsattn.linear_attention with feature_map="identity" (the op's
kernels, forward and backward, unchanged). dsattn.recover.linearize trains them by attention transfer."""

import torch
from torch import nn

from dsattn.ops.linear_attention import linear_attention


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] over the features, per head h: x [B, H, S, D]
    -> [B, H, S, 2F]. Softmax features are positive and bounded (the normalizer of linear attention stays
    positive, nothing overflows) and, trained, spiky like softmax attention, which elu/relu maps are not
    (Hedgehog's point). W starts as the identity (F = D): before training phi is a fixed softmax map."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None, *, dtype=None, device=None):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        if min(heads, head_dim, feature_dim) < 1:
            raise ValueError(f"HedgehogFeatureMap: heads, head_dim and feature_dim must be >= 1, got "
                             f"{heads}, {head_dim}, {feature_dim}")
        self.heads, self.head_dim, self.feature_dim = heads, head_dim, feature_dim
        weight = torch.zeros(heads, head_dim, feature_dim, dtype=dtype, device=device)
        eye = torch.arange(min(head_dim, feature_dim), device=device)
        weight[:, eye, eye] = 1
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, feature_dim, dtype=dtype, device=device))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"HedgehogFeatureMap: x must be [B, {self.heads}, S, {self.head_dim}], got "
                             f"{list(x.shape)}")
        # float32 at least: a bf16 softmax over the features would round the small entries to 0
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = torch.einsum("bhsd,hdf->bhsf", x.to(dtype), self.weight.to(dtype)) + self.bias.to(dtype)[:, None]
        return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1).to(x.dtype)

    def extra_repr(self):
        return f"heads={self.heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


class QKFeatureMaps(nn.Module):
    """The learnable feature maps of one attention layer: `q` over its Hq query heads, `k` over its Hkv key
    heads (GQA), both [., ., S, Dqk] -> [., ., S, 2F]."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, feature_dim: int | None = None, *, dtype=None,
                 device=None):
        super().__init__()
        self.q = HedgehogFeatureMap(q_heads, head_dim, feature_dim, dtype=dtype, device=device)
        self.k = HedgehogFeatureMap(kv_heads, head_dim, feature_dim, dtype=dtype, device=device)


def learned_linear_attention(q, k, v, maps: QKFeatureMaps, **kw):
    """Causal linear attention with learnable feature maps: dsattn.linear_attention(maps.q(q), maps.k(k), v,
    feature_map="identity", **kw)."""
    return linear_attention(maps.q(q), maps.k(k), v, feature_map="identity", **kw)


class LinearAttention(nn.Module):
    """feature_map: a name (dsattn.linear_attention's maps) or a QKFeatureMaps module (learnable; a
    submodule, so its parameters train and save with the model)."""

    def __init__(self, *, feature_map: str | QKFeatureMaps = "elu", causal: bool = True, normalize: bool = True,
                 eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.feature_map, self.causal, self.normalize, self.eps, self.backend = feature_map, causal, normalize, eps, backend

    def forward(self, q, k, v, state=None, output_final_state: bool = False):
        kw = dict(causal=self.causal, normalize=self.normalize, eps=self.eps, initial_state=state,
                  output_final_state=output_final_state, backend=self.backend)
        if isinstance(self.feature_map, nn.Module):
            return learned_linear_attention(q, k, v, self.feature_map, **kw)
        return linear_attention(q, k, v, feature_map=self.feature_map, **kw)

    def extra_repr(self):
        fm = "learned" if isinstance(self.feature_map, nn.Module) else repr(self.feature_map)
        return f"feature_map={fm}, causal={self.causal}, normalize={self.normalize}, backend={self.backend!r}"
