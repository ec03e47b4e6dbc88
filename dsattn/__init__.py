"""dsattn: fused kernels for DeepSeek-style attention and 4-bit GEMM, patched into transformers in one line.

    import dsattn
    dsattn.patch(model, attention="sparse", quantize="int4")
"""

__version__ = "0.1.0"

from dsattn import reference
from dsattn.ops.hybrid_attention import hybrid_attention
from dsattn.ops.indexer_kl_loss import indexer_kl_loss
from dsattn.ops.int4_grouped_matmul import int4_grouped_matmul
from dsattn.ops.int4_matmul import int4_matmul
from dsattn.ops.int8_matmul import int8_matmul
from dsattn.ops.lightning_indexer_topk import lightning_indexer_topk
from dsattn.ops.linear_attention import linear_attention
from dsattn.ops.paged_sliding_window_attention import paged_sliding_window_attention
from dsattn.ops.sliding_window_attention import sliding_window_attention, sliding_window_attention_varlen
from dsattn.ops.sparse_attention import sparse_attention
from dsattn.ops.topk_sparse_attention import topk_sparse_attention
from dsattn.quant.int4 import Int4Weight, quantize_int4
from dsattn.quant.int8 import Int8Weight, quantize_int8
from dsattn import nn, registry
from dsattn.patching import patch, patch_summary, unpatch

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "hybrid_attention",
    "indexer_kl_loss",
    "int4_grouped_matmul",
    "int4_matmul",
    "int8_matmul",
    "lightning_indexer_topk",
    "linear_attention",
    "nn",
    "paged_sliding_window_attention",
    "patch",
    "patch_summary",
    "quantize_int4",
    "quantize_int8",
    "reference",
    "registry",
    "sliding_window_attention",
    "sliding_window_attention_varlen",
    "sparse_attention",
    "topk_sparse_attention",
    "unpatch",
]
