"""Drop-in nn.Modules built on dsattn's functional ops."""

from dsattn.nn.hybrid_attention import HybridAttention
from dsattn.nn.int4_linear import Int4Experts, Int4Linear
from dsattn.nn.int8_linear import Int8Linear
from dsattn.nn.linear_attention import LinearAttention
from dsattn.nn.sliding_window_attention import SlidingWindowAttention
from dsattn.nn.topk_sparse_attention import TopKSparseAttention

__all__ = ["HybridAttention", "Int4Experts", "Int4Linear", "Int8Linear", "LinearAttention", "SlidingWindowAttention", "TopKSparseAttention"]
