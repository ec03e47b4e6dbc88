"""topk_sparse_attention: the custom op torch.ops.dsattn.topk_sparse_attention and its functional entry
(validate, pick a backend from dsattn.capabilities, call the op). Per query and head, softmax attention over
only its top_k keys by q.k. Gradients flow through the selected keys only; the selection is not
differentiated."""

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.ops.sparse_attention import sparse_attention_bwd_op
from dsattn.torch_backend import topk_sparse_attention as _torch
from dsattn.torch_backend.topk_sparse_attention import per_query_head, topk_indices

OP = "topk_sparse_attention"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


def _triton_select(q, k, top_k: int, causal: bool) -> torch.Tensor:
    """Selection by the indexer's Triton kernel (each query head one index head, unit weight, no relu: the
    ranking by q.k): int32 [B, Hq, Sq, min(top_k, Sk)]. The kernel's indices are in range by construction:
    no host-side check."""
    from dsattn.ops.lightning_indexer_topk import triton_topk

    kept = min(top_k, k.shape[2])
    idx = triton_topk(q[:, :, :, None, :], k, None, kept, scale=1.0, causal=causal, relu=False)
    if idx is None:  # beyond the kernel's top_k limit: the torch backend's chunked selection
        idx = topk_indices(q, k, kept, causal=causal)
    return idx


def _triton(q, k, v, top_k: int, causal: bool, scale: float):
    """Selection by _triton_select, attention by the Triton sparse-attention kernel. The indices differ per
    query head, so K/V go to sparse attention once per query head (a copy under GQA)."""
    from dsattn.triton_kernels import sparse_attention as _sparse

    hq = q.shape[1]
    idx = _triton_select(q, k, top_k, causal)
    return _sparse.sparse_attention(q, per_query_head(k, hq), per_query_head(v, hq), idx, causal=causal,
                                    scale=scale)


def _topk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, causal: bool,
                           scale: float, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _triton(q, k, v, top_k, causal, scale)
    return _torch.topk_sparse_attention(q, k, v, top_k, causal=causal, scale=scale)


topk_sparse_attention_op = define_op(OP, _topk_sparse_attention)


def _topk_sparse_attention_fwd_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, causal: bool,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's training forward: (out, base-2 lse fp32 [B, Hq, Sq], the selected indices int32
    [B, Hq, Sq, min(top_k, Sk)]); internal, so that the backward reuses the selection and the lse."""
    from dsattn.triton_kernels import sparse_attention as _sparse

    hq = q.shape[1]
    idx = _triton_select(q, k, top_k, causal)
    out, lse = _sparse.sparse_attention_fwd_lse(q, per_query_head(k, hq), per_query_head(v, hq), idx,
                                                causal=causal, scale=scale)
    return out, lse, idx


topk_sparse_attention_fwd_lse_op = define_op(OP + "_fwd_lse", _topk_sparse_attention_fwd_lse)


def _triton_backward(grad_out, q, k, v, idx, out, lse, causal: bool, scale: float):
    """The sparse-attention Triton backward over the selected keys (per query head, on per-query-head K/V);
    a GQA group's dk/dv are the sum over its query heads."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    dq, dk, dv = sparse_attention_bwd_op(grad_out, q, per_query_head(k, hq), per_query_head(v, hq), idx, out, lse,
                                         causal, scale)
    if hkv != hq:
        dk = dk.view(b, hkv, hq // hkv, *dk.shape[2:]).sum(2, dtype=torch.float32).to(k.dtype)
        dv = dv.view(b, hkv, hq // hkv, *dv.shape[2:]).sum(2, dtype=torch.float32).to(v.dtype)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, top_k, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.options = dict(top_k=top_k, causal=causal, scale=scale)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    if ctx.backend == "triton":
        # Reached when the public op is called directly with backend="triton" (the functional entry takes
        # the _fwd_lse op, which saves the selection and lse): select and recompute them (same kernels, same keys).
        o = ctx.options
        out, lse, idx = topk_sparse_attention_fwd_lse_op(q, k, v, o["top_k"], o["causal"], o["scale"])
        dq, dk, dv = _triton_backward(grad_out, q, k, v, idx, out, lse, o["causal"], o["scale"])
    else:
        dq, dk, dv = _torch.topk_sparse_attention_backward(grad_out, q, k, v, **ctx.options)
    return dq, dk, dv, None, None, None, None


topk_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_fwd_lse(ctx, inputs, output):
    q, k, v, top_k, causal, scale = inputs
    out, lse, idx = output
    ctx.save_for_backward(q, k, v, idx, out, lse)
    ctx.options = (causal, scale)
    ctx.mark_non_differentiable(lse, idx)


def _backward_fwd_lse(ctx, grad_out, grad_lse, grad_idx):
    q, k, v, idx, out, lse = ctx.saved_tensors
    dq, dk, dv = _triton_backward(grad_out, q, k, v, idx, out, lse, *ctx.options)
    return dq, dk, dv, None, None, None


topk_sparse_attention_fwd_lse_op.register_autograd(_backward_fwd_lse, setup_context=_setup_context_fwd_lse)


def _select(backend: str, q, k, v, top_k: int) -> str:
    # The kernels offset in int32 within one (batch, head) slice of q and k/v (the per-query-head copy of K/V
    # under GQA is contiguous, so no wider than the original's slice).
    offset = capabilities.max_offset(q[0, 0], k[0, 0], v[0, 0]) if q.numel() and k.numel() and v.numel() else 0
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k, v), top_k=top_k, offset=offset)
    return _backend.select_backend(OP, backend, q.device, request, auto_order=AUTO_ORDER.get(q.device.type))


def topk_sparse_attention(q, k, v, top_k, *, causal=True, scale=None, backend="auto"):
    """Exact per-row top-k: each (query, head) keeps the top_k keys by score q.k among visible keys (causal:
    j <= i + Sk - Sq), then softmax attention over those only. top_k >= Sk equals dense attention.

    q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (any strides, Hq % Hkv == 0) -> [B, Hq, Sq, Dv]
    in q's dtype. Backends: "triton" (CUDA; fp16/bf16/fp32; selection by the lightning-indexer Triton kernel
    for min(top_k, Sk) <= its limit, beyond by the torch chunked top-k; attention by the Triton
    sparse-attention kernel, whose backward gives the gradients through the selected keys), "torch"
    (query-chunked, O(chunk x Sk) memory, has a backward). "auto": Triton on CUDA, torch on CPU and for float64.
    """
    shape = _checks.check_qkv(OP, q, k, v)
    top_k = _checks.check_int(OP, "top_k", top_k, minimum=1)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    chosen = _select(backend, q, k, v, top_k)
    if chosen == "triton" and _backend.needs_grad(q, k, v):
        return topk_sparse_attention_fwd_lse_op(q, k, v, top_k, causal, scale)[0]
    return topk_sparse_attention_op(q, k, v, top_k, causal, scale, chosen)
