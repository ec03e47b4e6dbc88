"""dsattn.topk_sparse_attention: per query and head, softmax attention over only its top_k keys by q.k."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.topk_sparse_attention import topk_sparse_attention as _topk_torch

OP = "topk_sparse_attention"
IMPLEMENTED = ("torch", "triton")


def topk_sparse_attention(q, k, v, top_k, *, causal=True, scale=None, backend="auto"):
    """Exact per-row top-k: each (query, head) keeps the top_k keys by score q.k among visible keys (causal:
    j <= i + Sk - Sq), then softmax attention over those only. top_k >= Sk equals dense attention.

    "triton": selection by the streaming top-k (torch), attention by the Triton sparse-attention kernel.
    """
    shape = _checks.check_qkv(OP, q, k, v)
    _checks.check_int(OP, "top_k", top_k, minimum=1)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    chosen = _backend.select_backend(OP, backend, q.device, IMPLEMENTED)
    if chosen == "torch":
        return _topk_torch(q, k, v, top_k, causal=causal, scale=scale)
    import functools

    from dsattn.ops.sparse_attention import sparse_attention

    kernel = functools.partial(sparse_attention, backend="triton")
    return _topk_torch(q, k, v, top_k, causal=causal, scale=scale, sparse_attention=kernel)
