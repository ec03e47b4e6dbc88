"""sparse_attention: each query attends to exactly the keys its `indices` row lists (DeepSeek-V3.2 DSA).

Semantics (SPEC): indices int32 or int64, [B, Sq, topk] (shared by every head) or [B, Hkv, Sq, topk]; -1 is
"no key"; with causal=True listed keys after the query's position (i + Sk - Sq) are skipped; a duplicated
index is attended once per listing (gather semantics; DeepSeek's indexer never emits duplicates); a row with
no valid key outputs zeros. Any index outside [-1, Sk) is a ValueError.

The range check reads indices.min()/max() back to the host: one device sync per call. Under CUDA graph
capture it is skipped (a sync cannot be captured); the kernel then treats out-of-range entries as -1, so a
bad index never reads outside k/v.
"""

import torch

from dsattn import _backend, _checks
from dsattn.reference.sparse_attention import sparse_attention as _sparse_attention_torch

OP = "sparse_attention"
IMPLEMENTED = ("triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_indices(indices, shape: _checks.AttentionShape, q: torch.Tensor) -> None:
    _checks.check_tensor(OP, "indices", indices, dtypes=_checks.INDEX_DTYPES)
    _checks.check_same_device(OP, q=q, indices=indices)
    b, hkv, sq = shape.batch, shape.heads_kv, shape.seq_q
    if indices.dim() == 3:
        expected = (b, sq)
        got = tuple(indices.shape[:2])
    elif indices.dim() == 4:
        expected = (b, hkv, sq)
        got = tuple(indices.shape[:3])
    else:
        raise ValueError(
            f"dsattn.{OP}: indices must be 3-D [B, Sq, topk] or 4-D [B, Hkv, Sq, topk], got {indices.dim()}-D "
            f"with shape {tuple(indices.shape)}"
        )
    if got != expected:
        names = "[B, Sq, topk]" if indices.dim() == 3 else "[B, Hkv, Sq, topk]"
        raise ValueError(
            f"dsattn.{OP}: indices must be {names} = {expected + ('topk',)} for these q/k, got {tuple(indices.shape)}"
        )
    capturing = indices.is_cuda and torch.cuda.is_current_stream_capturing()
    if indices.numel() and not capturing:
        low, high = (int(x) for x in torch.aminmax(indices))
        if low < -1 or high >= shape.seq_k:
            raise ValueError(
                f"dsattn.{OP}: indices must lie in [-1, Sk={shape.seq_k}) (-1 = no key), got values in [{low}, {high}]"
            )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each query row over only the keys listed in `indices`.

    q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (any strides, Hq % Hkv == 0);
    indices [B, Sq, topk] or [B, Hkv, Sq, topk], int32 (int64 accepted, converted). Returns [B, Hq, Sq, Dv]
    in q's dtype. Cost O(Sq x topk x D); no O(Sq x Sk) tensor.
    """
    shape = _checks.check_qkv(OP, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    _check_indices(indices, shape, q)
    implemented = IMPLEMENTED if q.dtype in TRITON_DTYPES else ("torch",)
    if backend == "triton" and q.dtype not in TRITON_DTYPES:
        raise TypeError(f"dsattn.{OP}: backend='triton' supports float16, bfloat16, float32; got q {q.dtype}")
    chosen = _backend.select_backend(OP, backend, q.device, implemented)
    if chosen == "torch":
        return _sparse_attention_torch(q, k, v, indices, causal=causal, scale=scale)
    from dsattn.triton_kernels.sparse_attention import sparse_attention as _sparse_attention_triton

    if indices.dtype != torch.int32:
        indices = indices.to(torch.int32)  # values already checked to fit
    return _sparse_attention_triton(q, k, v, indices, causal=causal, scale=scale)
