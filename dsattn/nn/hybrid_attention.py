"""HybridAttention: dsattn.hybrid_attention as an nn.Module (q, k, v [B, H, S, D])."""

from torch import nn

from dsattn.ops.hybrid_attention import hybrid_attention


class HybridAttention(nn.Module):
    def __init__(self, *, prefix: int = 2048, window: int = 0, feature_map: str = "elu", scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.prefix, self.window, self.feature_map, self.scale, self.backend = prefix, window, feature_map, scale, backend

    def forward(self, q, k, v):
        return hybrid_attention(q, k, v, prefix=self.prefix, window=self.window, feature_map=self.feature_map,
                                scale=self.scale, backend=self.backend)

    def extra_repr(self):
        return f"prefix={self.prefix}, window={self.window}, feature_map={self.feature_map!r}, backend={self.backend!r}"
