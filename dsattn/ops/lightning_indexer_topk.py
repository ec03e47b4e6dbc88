"""lightning_indexer_topk: the custom op torch.ops.dsattn.lightning_indexer_topk and its functional entry
(validate, pick a backend from dsattn.capabilities, call the op). DeepSeek-V3.2's indexer scores + top-k,
never materializing the [B, Sq, Hi, Sk] scores.

The output is int32 indices: nothing to differentiate, so the op has no backward, its output no grad_fn, and
every backend serves calls whose float inputs require grad (capabilities declares them all able to)."""

import torch

from dsattn import _backend, _checks, _ext, capabilities
from dsattn._library import define_op
from dsattn.torch_backend import lightning_indexer_topk as _torch
from dsattn.torch_backend.lightning_indexer_topk import KEY_CHUNK, QUERY_CHUNK

OP = "lightning_indexer_topk"
# On CPU the compiled path (one score pass, radix select) wins from a few hundred keys per row on (the torch
# streaming top-k re-sorts its running top-k against every key chunk: O(Sq x Sk x log) in torch.topk). Below,
# torch is kept: its torch.topk breaks ties as transformers' own V3.2 indexer does, and ties are common where
# few index heads relu to exactly 0 (small models), so patched tiny V3.2 models equal their eager path exactly.
CPP_FROM_TOP_K = 256


def _auto_order(device: torch.device, top_k: int, sk: int):
    if device.type == "cuda":  # Triton takes min(top_k, Sk) up to its declared max_top_k; beyond, CUDA
        return ("triton", "cuda", "torch")
    return ("cpp", "torch") if min(top_k, sk) >= CPP_FROM_TOP_K else ("torch",)


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


def _select(backend: str, q_idx, k_idx, weights, top_k: int) -> str:
    # Rows never list more than Sk keys: the kernels run at min(top_k, Sk) and pad with -1.
    request = capabilities.Request(dtype=torch.promote_types(q_idx.dtype, k_idx.dtype),
                                   grad=_backend.needs_grad(q_idx, k_idx, weights),
                                   top_k=max(1, min(top_k, k_idx.shape[1])),
                                   offset=capabilities.max_offset(q_idx, k_idx, weights))
    return _backend.select_backend(OP, backend, q_idx.device, request,
                                   auto_order=_auto_order(q_idx.device, top_k, k_idx.shape[1]))


def triton_topk(q, k, weights, top_k, *, scale, causal, relu=True):
    """The Triton kernel on q [B, G, Sq, Hi, D], k [B, Gk, Sk, D], weights [B, G, Sq, Hi] or None (unit):
    int32 [B, G, Sq, top_k]. Rows never list more than Sk keys, so the kernel runs at min(top_k, Sk) and the
    rest is -1; None when that still exceeds the kernel's top_k limit (the caller selects otherwise then).
    No host reads: it traces inside a custom op."""
    from dsattn.triton_kernels import lightning_indexer_topk as _triton

    b, g, sq = q.shape[:3]
    sk = k.shape[2]
    kept = max(1, min(top_k, sk))
    if kept > _triton.MAX_TOP_K:
        return None
    out = _triton.indexer_topk(q, k, weights, kept, scale=scale, causal=causal, relu=relu)
    if kept < top_k:
        out = torch.cat([out, out.new_full((b, g, sq, top_k - kept), -1)], dim=-1)
    return out


def select_topk(q_idx, k_idx, weights, top_k, *, scale, causal, query_chunk=QUERY_CHUNK, key_chunk=KEY_CHUNK):
    """The "cuda" / "cpp" path: per batch and query chunk, fp32 scores [chunk_q, Sk] from _chunk_scores over key
    chunks, then the compiled radix-select torch.ops.dsattn_C.topk_select with each row's causal length. Memory
    O(chunk_q x Sk + chunk_q x Hi x key_chunk): never [B, Sq, Sk] nor [chunk_q, Hi, Sk]. Bounds are Python
    ints (no host read), so it traces."""
    b, sq = q_idx.shape[:2]
    sk = k_idx.shape[1]
    out = torch.full((b, sq, top_k), -1, dtype=torch.int32, device=q_idx.device)
    if sq == 0 or sk == 0:
        return out
    buf = torch.empty((min(query_chunk, sq), sk), dtype=torch.float32, device=q_idx.device)
    # Reused per chunk (fresh multi-MB outputs page-fault on every call on the CPU).
    cq, hi = min(query_chunk, sq), q_idx.shape[2]
    work = (torch.empty(cq * hi * min(key_chunk, sk), dtype=torch.float32, device=q_idx.device),
            torch.empty(cq * min(key_chunk, sk), dtype=torch.float32, device=q_idx.device))
    for qs in range(0, sq, query_chunk):
        qe = min(qs + query_chunk, sq)
        pos = torch.arange(qs, qe, device=q_idx.device) + (sk - sq)  # absolute query positions
        last_key = min(sk, qe + sk - sq) if causal else sk
        if last_key <= 0:
            continue
        lengths = (pos + 1).clamp(0, sk).to(torch.int32) if causal else None
        scores = buf[: qe - qs, :last_key]  # rows keep stride Sk: the kernel takes any row stride
        for bi in range(b):
            q = q_idx[bi, qs:qe].float()
            w = weights[bi, qs:qe].float()
            if scale > 0:  # relu(scale * x) = scale * relu(x): the scale rides on the [chunk_q, Hi] weights
                w = w * scale
            else:
                q = q * scale
            for ks in range(0, last_key, key_chunk):
                ke = min(ks + key_chunk, last_key)
                _chunk_scores(q, k_idx[bi, ks:ke].float(), w, scores[:, ks:ke], work)
            out[bi, qs:qe] = torch.ops.dsattn_C.topk_select(scores, lengths, top_k)
    return out


def _chunk_scores(q, k, w, dst, work):
    """dst [cq, ck] = sum_h w[:, h] * relu(q[:, h] . k^T) for fp32 q [cq, Hi, D], k [ck, D], w [cq, Hi]: one
    matmul over all heads, relu in place, the head sum as a batched [1, Hi] x [Hi, ck] product (no scaled or
    relu'd copies of the [cq, Hi, ck] block); `work` holds the two flat fp32 buffers they are written to."""
    cq, hi, d = q.shape
    ck = k.shape[0]
    s = torch.mm(q.reshape(cq * hi, d), k.t(), out=work[0][: cq * hi * ck].view(cq * hi, ck)).relu_()
    summed = torch.bmm(w.unsqueeze(1), s.view(cq, hi, ck), out=work[1][: cq * ck].view(cq, 1, ck))
    dst.copy_(summed.squeeze(1))


def fused_cpu_topk(q_idx, k_idx, weights, top_k, *, scale, causal, isa=-1):
    """The "cpp" path: torch.ops.dsattn_C.lightning_indexer_topk (scores and radix top-k fused per few query
    rows, csrc/cpu/lightning_indexer_topk.cpp) on fp32 inputs, the scale folded into the weights (relu(s x) =
    s relu(x) for s > 0) or else into q."""
    q = q_idx.float()
    w = weights.float()
    if scale > 0:
        w = w * scale
    else:
        q = q * scale
    return torch.ops.dsattn_C.lightning_indexer_topk(q.contiguous(), k_idx.float().contiguous(), w.contiguous(),
                                                     top_k, causal, isa)


def _lightning_indexer_topk(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, top_k: int,
                            scale: float, causal: bool, backend: str) -> torch.Tensor:
    if backend == "cpp" and _ext.has_kernel("lightning_indexer_topk", "CPU"):
        return fused_cpu_topk(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
    if backend in ("cuda", "cpp"):
        return select_topk(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)
    if backend == "triton":  # the selection guarantees min(top_k, Sk) within the kernel's limit
        out = triton_topk(q_idx[:, None], k_idx[:, None], weights[:, None], top_k, scale=scale, causal=causal)
        return out.squeeze(1)
    return _torch.lightning_indexer_topk(q_idx, k_idx, weights, top_k, scale=scale, causal=causal)


lightning_indexer_topk_op = define_op(OP, _lightning_indexer_topk)


def lightning_indexer_topk(q_idx, k_idx, weights, top_k, *, scale=None, causal=True, backend="auto"):
    """score[b,i,j] = sum_h weights[b,i,h] * relu(scale * q_idx[b,i,h,:] . k_idx[b,j,:]) (transformers'
    DeepSeek-V3.2 indexer: pass its softmax_scale as `scale` and its head-scaled weights as `weights`).

    q_idx [B, Sq, Hi, D], k_idx [B, Sk, D], weights [B, Sq, Hi]; scale defaults to D ** -0.5. Returns int32
    [B, Sq, top_k]: the top_k highest-scoring visible keys (causal: j <= i + Sk - Sq), highest first, -1 where
    fewer are visible. Ties among equal scores: "cuda"/"cpp" take the lower index; others break them arbitrarily.
    Indices are not differentiated: inputs may require grad, the output never has a grad_fn.

    "triton": one streaming kernel (running top-k in registers, scores never stored) for
    min(top_k, Sk) <= 2048 and fp16/bf16/fp32.
    "cpp" (any top_k, fp16/bf16/fp32): one compiled kernel, scores of a few query rows against the keys they see
    (fp32, AVX-512 where the CPU has it) then the radix-select top-k per row (csrc/cpu/lightning_indexer_topk.cpp).
    "cuda": fp32 scores of a query chunk against all keys [chunk_q, Sk] (torch matmuls), then a compiled
    radix-select top-k per row (csrc/cuda/topk_select.cu).
    "torch": the query-chunked streaming top-k (dsattn.torch_backend.lightning_indexer_topk), any dtype.
    "auto": triton on CUDA, beyond its limits cuda, then torch; on CPU cpp when min(top_k, Sk) >= 256, else torch.
    The limits are declared in dsattn.capabilities.
    """
    scale = check_indexer_inputs(q_idx, k_idx, weights, top_k, scale)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    chosen = _select(backend, q_idx, k_idx, weights, top_k)
    return lightning_indexer_topk_op(q_idx, k_idx, weights, top_k, scale, causal, chosen)
