"""dsattn.topk_sparse_attention: per query and head, softmax attention over only its top_k keys by q.k."""

from dsattn import _backend, _checks
from dsattn.reference.topk_sparse_attention import per_query_head, topk_indices
from dsattn.reference.topk_sparse_attention import topk_sparse_attention as _topk_torch

OP = "topk_sparse_attention"
IMPLEMENTED = ("torch", "triton")


def _triton(q, k, v, top_k, *, causal, scale):
    """Selection by the indexer's Triton kernel (each query head one index head, unit weight, no relu: the
    reference's ranking by q.k), attention by the Triton sparse-attention kernel. The indices differ per query
    head, so K/V go to sparse attention once per query head (a copy under GQA), as in the reference."""
    from dsattn.ops.lightning_indexer_topk import TRITON_DTYPES, triton_topk
    from dsattn.ops.sparse_attention import sparse_attention

    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"dsattn.{OP}: backend='triton' supports float16, bfloat16, float32 (q and k alike); got "
                        f"q {q.dtype}, k {k.dtype}")
    hq, sk = q.shape[1], k.shape[2]
    idx = triton_topk(q[:, :, :, None, :], k, None, min(top_k, sk), scale=1.0, causal=causal, relu=False)
    if idx is None:  # top_k beyond the kernel's limit: the reference's streaming selection
        idx = topk_indices(q, k, min(top_k, sk), causal=causal)
    return sparse_attention(q, per_query_head(k, hq), per_query_head(v, hq), idx,
                            causal=causal, scale=scale, backend="triton")


def topk_sparse_attention(q, k, v, top_k, *, causal=True, scale=None, backend="auto"):
    """Exact per-row top-k: each (query, head) keeps the top_k keys by score q.k among visible keys (causal:
    j <= i + Sk - Sq), then softmax attention over those only. top_k >= Sk equals dense attention.

    "triton": selection by the lightning-indexer Triton kernel (streaming top-k, min(top_k, Sk) <= 2048; beyond,
    the torch streaming top-k), attention by the Triton sparse-attention kernel.
    """
    shape = _checks.check_qkv(OP, q, k, v)
    _checks.check_int(OP, "top_k", top_k, minimum=1)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    chosen = _backend.select_backend(OP, backend, q.device, IMPLEMENTED)
    if chosen == "torch":
        return _topk_torch(q, k, v, top_k, causal=causal, scale=scale)
    return _triton(q, k, v, top_k, causal=causal, scale=scale)
