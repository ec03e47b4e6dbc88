"""The oracles: plain-PyTorch implementations of every dsattn op, written for clarity (dense, O(seq^2) memory:
for tests), proven in float64 against brute-force loops, and what every backend is tested against. The
tuned chunked code that serves backend="torch" is dsattn.torch_backend."""

from dsattn.reference.hybrid_attention import hybrid_attention
from dsattn.reference.indexer_kl_loss import indexer_kl_loss
from dsattn.reference.int4 import pack_int4, unpack_int4
from dsattn.reference.lightning_indexer_topk import lightning_indexer_topk
from dsattn.reference.linear_attention import linear_attention
from dsattn.reference.sliding_window_attention import sliding_window_attention, sliding_window_attention_varlen
from dsattn.reference.sparse_attention import sparse_attention
from dsattn.reference.topk_sparse_attention import topk_sparse_attention

__all__ = [
    "hybrid_attention",
    "indexer_kl_loss",
    "lightning_indexer_topk",
    "linear_attention",
    "pack_int4",
    "sliding_window_attention",
    "sliding_window_attention_varlen",
    "sparse_attention",
    "topk_sparse_attention",
    "unpack_int4",
]
