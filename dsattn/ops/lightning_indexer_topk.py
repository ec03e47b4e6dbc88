"""dsattn.lightning_indexer_topk: DeepSeek-V3.2's indexer scores + top-k, never materializing the scores."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.lightning_indexer_topk import QUERY_CHUNK, KEY_CHUNK, indexer_scores
from dsattn.reference.lightning_indexer_topk import lightning_indexer_topk as _indexer_torch

OP = "lightning_indexer_topk"
IMPLEMENTED = ("triton", "cuda", "cpp", "torch")
KERNELS = {"cuda": "topk_select", "cpp": "topk_select"}
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_TOP_K = 2048  # dsattn.triton_kernels.lightning_indexer_topk.MAX_TOP_K (not imported: Triton is optional)


def _auto_order(device: torch.device, top_k: int, sk: int):
    large = min(top_k, sk) > TRITON_MAX_TOP_K
    if device.type == "cuda":
        return ("cuda", "triton", "torch") if large else ("triton", "cuda", "torch")
    # CPU: the radix select wins clearly only at large top_k (bench_lightning_indexer_topk.py: 0.53 vs 0.92 s at
    # S=5120 top_k 4096; 12.9 vs 14.7 ms at 1024/64, 66 vs 69 ms at 2048/256). Below 2048 the torch path is
    # kept: its torch.topk breaks ties as transformers' own V3.2 indexer does, and ties are common where few
    # index heads relu to exactly 0 (small models), so patched V3.2 then equals its eager path exactly.
    return ("cpp", "torch") if large else ("torch", "cpp")


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
    from dsattn.triton_kernels.lightning_indexer_topk import MAX_TOP_K, indexer_topk

    b, g, sq = q.shape[:3]
    sk = k.shape[2]
    kept = max(1, min(top_k, sk))
    if kept > MAX_TOP_K:
        return None
    out = indexer_topk(q, k, weights, kept, scale=scale, causal=causal, relu=relu)
    if kept < top_k:
        out = torch.cat([out, out.new_full((b, g, sq, top_k - kept), -1)], dim=-1)
    return out


def select_topk(q_idx, k_idx, weights, top_k, *, scale, causal, query_chunk=QUERY_CHUNK, key_chunk=KEY_CHUNK):
    """The "cuda" / "cpp" path: per batch and query chunk, fp32 scores [chunk_q, Sk] from indexer_scores over key
    chunks, then the compiled radix-select torch.ops.dsattn_C.topk_select with each row's causal length. Memory
    O(chunk_q x Sk + chunk_q x Hi x key_chunk): never [B, Sq, Sk] nor [chunk_q, Hi, Sk]."""
    b, sq = q_idx.shape[:2]
    sk = k_idx.shape[1]
    out = torch.full((b, sq, top_k), -1, dtype=torch.int32, device=q_idx.device)
    if sq == 0 or sk == 0:
        return out
    buf = torch.empty((min(query_chunk, sq), sk), dtype=torch.float32, device=q_idx.device)
    for qs in range(0, sq, query_chunk):
        qe = min(qs + query_chunk, sq)
        pos = torch.arange(qs, qe, device=q_idx.device) + (sk - sq)  # absolute query positions
        last_key = min(sk, qe + sk - sq) if causal else sk
        if last_key <= 0:
            continue
        lengths = (pos + 1).clamp(0, sk).to(torch.int32) if causal else None
        scores = buf[: qe - qs, :last_key]  # rows keep stride Sk: the kernel takes any row stride
        for bi in range(b):
            for ks in range(0, last_key, key_chunk):
                ke = min(ks + key_chunk, last_key)
                scores[:, ks:ke] = indexer_scores(q_idx[bi : bi + 1, qs:qe], k_idx[bi : bi + 1, ks:ke],
                                                  weights[bi : bi + 1, qs:qe], scale)[0]
            out[bi, qs:qe] = torch.ops.dsattn_C.topk_select(scores, lengths, top_k)
    return out


def lightning_indexer_topk(q_idx, k_idx, weights, top_k, *, scale=None, causal=True, backend="auto"):
    """score[b,i,j] = sum_h weights[b,i,h] * relu(scale * q_idx[b,i,h,:] . k_idx[b,j,:]) (transformers'
    DeepSeek-V3.2 indexer: pass its softmax_scale as `scale` and its head-scaled weights as `weights`).

    q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi]; scale defaults to D ** -0.5. Returns int32
    [B, Sq, top_k]: the top_k highest-scoring visible keys (causal: j <= i + Sk - Sq), highest first, -1 where
    fewer are visible. Ties among equal scores: "cuda"/"cpp" take the lower index; others break them arbitrarily.

    "triton": one streaming kernel (running top-k in registers, scores never stored) for
    min(top_k, Sk) <= 2048 and fp16/bf16/fp32; a larger top_k takes the torch query-chunked streaming top-k.
    "cuda" / "cpp" (any top_k, fp16/bf16/fp32): fp32 scores of a query chunk against all keys [chunk_q, Sk]
    (torch matmuls), then a compiled radix-select top-k per row (csrc/{cuda,cpu}/topk_select.*).
    "torch": the query-chunked streaming reference (dsattn.reference.lightning_indexer_topk).
    "auto": when min(top_k, Sk) <= 2048 triton on CUDA, torch on CPU; beyond, cuda on CUDA, cpp on CPU.
    """
    scale = check_indexer_inputs(q_idx, k_idx, weights, top_k, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    triton_ok = q_idx.dtype in TRITON_DTYPES and k_idx.dtype in TRITON_DTYPES
    if backend in ("triton", "cuda", "cpp") and not triton_ok:
        raise TypeError(f"dsattn.{OP}: backend={backend!r} supports float16, bfloat16, float32; got q_idx "
                        f"{q_idx.dtype}, k_idx {k_idx.dtype}")
    implemented = IMPLEMENTED if triton_ok else ("torch",)
    chosen = _backend.select_backend(OP, backend, q_idx.device, implemented, kernels=KERNELS,
                                     auto_order=_auto_order(q_idx.device, top_k, k_idx.shape[1]))
    if chosen in ("cuda", "cpp"):
        return select_topk(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
    if chosen == "triton":
        out = triton_topk(q_idx[:, None], k_idx[:, None], weights[:, None], top_k, scale=scale, causal=causal)
        if out is not None:
            return out[:, 0]
    return _indexer_torch(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
