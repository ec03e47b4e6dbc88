"""dsattn's Triton kernels, installed as `dsattn.triton_kernels` (never as top-level `triton_kernels`: that
import name belongs to the Triton project).

One module per op. Each exposes a launcher called by dsattn.ops.<op> and `aot_specs()`, the list of every
kernel config it can launch, which tests compile ahead of time for sm_80 and sm_90 (no spills, shared memory
within the device limit).
"""

KERNEL_MODULES = (
    "hybrid_attention",
    "indexer_kl_loss",
    "int4_grouped_matmul",
    "int4_matmul",
    "int4_unpack",
    "int8_matmul",
    "lightning_indexer_topk",
    "linear_attention",
    "paged_sliding_window_attention",
    "sliding_window_attention",
    "sparse_attention",
)
