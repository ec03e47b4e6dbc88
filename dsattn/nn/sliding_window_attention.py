"""SlidingWindowAttention: dsattn.sliding_window_attention as an nn.Module (q, k, v [B, H, S, D] like SDPA)."""

import torch
from torch import nn

from dsattn.ops.sliding_window_attention import sliding_window_attention


class SlidingWindowAttention(nn.Module):
    def __init__(self, window: int, *, causal: bool = True, scale: float | None = None, num_sinks_heads: int = 0,
                 backend: str = "auto"):
        super().__init__()
        self.window, self.causal, self.scale, self.backend = window, causal, scale, backend
        # Learned per-head sink logits (gpt-oss / DeepSeek-V4 s_aux) when num_sinks_heads > 0.
        self.sinks = nn.Parameter(torch.zeros(num_sinks_heads)) if num_sinks_heads else None

    def forward(self, q, k, v):
        return sliding_window_attention(q, k, v, self.window, causal=self.causal, scale=self.scale, sinks=self.sinks,
                                        backend=self.backend)

    def extra_repr(self):
        return f"window={self.window}, causal={self.causal}, sinks={self.sinks is not None}, backend={self.backend!r}"
