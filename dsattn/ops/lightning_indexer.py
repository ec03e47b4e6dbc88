"""dsattn.lightning_indexer_topk: DeepSeek-V3.2's indexer scores + top-k, never materializing the scores."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.lightning_indexer import lightning_indexer_topk as _indexer_torch

OP = "lightning_indexer_topk"
IMPLEMENTED = ("torch",)


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


def lightning_indexer_topk(q_idx, k_idx, weights, top_k, *, scale=None, causal=True, backend="auto"):
    """score[b,i,j] = sum_h weights[b,i,h] * relu(scale * q_idx[b,i,h,:] . k_idx[b,j,:]) (transformers'
    DeepSeek-V3.2 indexer: pass its softmax_scale as `scale` and its head-scaled weights as `weights`).

    q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi]; scale defaults to D ** -0.5. Returns int32
    [B, Sq, top_k]: the top_k highest-scoring visible keys (causal: j <= i + Sk - Sq), highest first, -1 where
    fewer are visible. Ties among equal scores are broken arbitrarily.
    """
    scale = check_indexer_inputs(q_idx, k_idx, weights, top_k, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    _backend.select_backend(OP, backend, q_idx.device, IMPLEMENTED)
    return _indexer_torch(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
