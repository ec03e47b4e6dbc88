"""dsattn.lightning_indexer_topk: DeepSeek-V3.2's indexer scores + top-k, never materializing the scores."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.lightning_indexer import lightning_indexer_topk as _indexer_torch

OP = "lightning_indexer_topk"
IMPLEMENTED = ("triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_indexer_inputs(q_idx, k_idx, weights, top_k, scale):
    _checks.check_tensor(OP, "q_idx", q_idx, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(OP, "k_idx", k_idx, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(OP, "weights", weights, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(OP, q_idx=q_idx, k_idx=k_idx, weights=weights)
    _checks.check_int(OP, "top_k", top_k, minimum=1)
    b, sq, hi, d = q_idx.shape
    if k_idx.shape[0] != b or k_idx.shape[2] != d:
        raise ValueError(f"dsattn.{OP}: k_idx must be [B={b}, Sk, D={d}], got {tuple(k_idx.shape)}")
    if tuple(weights.shape) != (b, sq, hi):
        raise ValueError(f"dsattn.{OP}: weights must be [B, Sq, Hi] = {(b, sq, hi)}, got {tuple(weights.shape)}")
    return _checks.check_scale(OP, scale, d**-0.5)


def triton_topk(q, k, weights, top_k, *, scale, causal, relu=True):
    """The Triton kernel on q [B, G, Sq, Hi, D], k [B, Gk, Sk, D], weights [B, G, Sq, Hi] or None (unit):
    int32 [B, G, Sq, top_k]. Rows never list more than Sk keys, so the kernel runs at min(top_k, Sk) and the
    rest is -1; None when that still exceeds the kernel's top_k limit (the caller streams in torch then)."""
    from dsattn.triton_kernels.lightning_indexer import MAX_TOP_K, indexer_topk

    b, g, sq = q.shape[:3]
    sk = k.shape[2]
    kept = max(1, min(top_k, sk))
    if kept > MAX_TOP_K:
        return None
    out = indexer_topk(q, k, weights, kept, scale=scale, causal=causal, relu=relu)
    if kept < top_k:
        out = torch.cat([out, out.new_full((b, g, sq, top_k - kept), -1)], dim=-1)
    return out


def lightning_indexer_topk(q_idx, k_idx, weights, top_k, *, scale=None, causal=True, backend="auto"):
    """score[b,i,j] = sum_h weights[b,i,h] * relu(scale * q_idx[b,i,h,:] . k_idx[b,j,:]) (transformers'
    DeepSeek-V3.2 indexer: pass its softmax_scale as `scale` and its head-scaled weights as `weights`).

    q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi]; scale defaults to D ** -0.5. Returns int32
    [B, Sq, top_k]: the top_k highest-scoring visible keys (causal: j <= i + Sk - Sq), highest first, -1 where
    fewer are visible. Ties among equal scores are broken arbitrarily.

    "triton": one streaming kernel (running top-k in registers, scores never stored) for
    min(top_k, Sk) <= 2048 and fp16/bf16/fp32; a larger top_k takes the torch query-chunked streaming top-k.
    """
    scale = check_indexer_inputs(q_idx, k_idx, weights, top_k, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    triton_ok = q_idx.dtype in TRITON_DTYPES and k_idx.dtype in TRITON_DTYPES
    if backend == "triton" and not triton_ok:
        raise TypeError(f"dsattn.{OP}: backend='triton' supports float16, bfloat16, float32; got q_idx "
                        f"{q_idx.dtype}, k_idx {k_idx.dtype}")
    chosen = _backend.select_backend(OP, backend, q_idx.device, IMPLEMENTED if triton_ok else ("torch",))
    if chosen == "triton":
        out = triton_topk(q_idx[:, None], k_idx[:, None], weights[:, None], top_k, scale=scale, causal=causal)
        if out is not None:
            return out[:, 0]
    return _indexer_torch(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
