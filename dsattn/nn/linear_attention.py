"""LinearAttention: dsattn.linear_attention as an nn.Module (q, k, v [B, H, S, D]); pass state= to carry the
LinearAttentionState (S, z and, for "exp", its shift m) across calls (decode)."""

from torch import nn

from dsattn.ops.linear_attention import linear_attention


class LinearAttention(nn.Module):
    def __init__(self, *, feature_map: str = "elu", causal: bool = True, normalize: bool = True, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        self.feature_map, self.causal, self.normalize, self.eps, self.backend = feature_map, causal, normalize, eps, backend

    def forward(self, q, k, v, state=None, output_final_state: bool = False):
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=self.causal, normalize=self.normalize,
                                eps=self.eps, initial_state=state, output_final_state=output_final_state,
                                backend=self.backend)

    def extra_repr(self):
        return (f"feature_map={self.feature_map!r}, causal={self.causal}, normalize={self.normalize}, "
                f"backend={self.backend!r}")
