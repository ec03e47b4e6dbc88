"""TopKSparseAttention: dsattn.topk_sparse_attention as an nn.Module (q, k, v [B, H, S, D] like SDPA)."""

from torch import nn

from dsattn.ops.topk_sparse_attention import topk_sparse_attention


class TopKSparseAttention(nn.Module):
    def __init__(self, top_k: int, *, causal: bool = True, scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.top_k, self.causal, self.scale, self.backend = top_k, causal, scale, backend

    def forward(self, q, k, v):
        return topk_sparse_attention(q, k, v, self.top_k, causal=self.causal, scale=self.scale, backend=self.backend)

    def extra_repr(self):
        return f"top_k={self.top_k}, causal={self.causal}, backend={self.backend!r}"
