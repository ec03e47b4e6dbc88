"""indexer_kl_loss: the custom op torch.ops.dsattn.indexer_kl_loss and its functional entry (validate, pick a
backend from dsattn.capabilities, call the op). DeepSeek-V3.2's indexer objective: KL(attention target ||
softmax of the index scores), streamed over key chunks, never holding [B, Sq, Sk].

Ops: indexer_kl_loss (the loss; its backward recomputes the forward's log-sum-exps), indexer_kl_loss_fwd
(loss and the log-sum-exps, which its backward reuses: the functional entry's path when a gradient is
wanted), indexer_kl_loss_bwd (gradients of q_idx, k_idx, weights). The target is a constant: q and k never
get a gradient (the functional entry detaches them).
"""

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.torch_backend import indexer_kl_loss as _torch

OP = "indexer_kl_loss"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


def _check_inputs(q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal):
    """Every argument checked by name before any launch; returns (scale, index_scale)."""
    for name, t, ndim in (("q_idx", q_idx, 4), ("k_idx", k_idx, 3), ("weights", weights, 3), ("q", q, 4),
                          ("k", k, 4)):
        _checks.check_tensor(OP, name, t, ndim=ndim, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(OP, q_idx=q_idx, k_idx=k_idx, weights=weights, q=q, k=k)
    _checks.check_same_dtype(OP, q=q, k=k)
    b, sq, hi, di = q_idx.shape
    if di == 0 or hi == 0:
        raise ValueError(f"dsattn.{OP}: q_idx must have index heads and a head dim > 0, got {tuple(q_idx.shape)}")
    if k_idx.shape[0] != b or k_idx.shape[2] != di:
        raise ValueError(f"dsattn.{OP}: k_idx must be [B={b}, Sk, Di={di}], got {tuple(k_idx.shape)}")
    if tuple(weights.shape) != (b, sq, hi):
        raise ValueError(f"dsattn.{OP}: weights must be [B, Sq, Hi] = {(b, sq, hi)}, got {tuple(weights.shape)}")
    sk = k_idx.shape[1]
    if q.shape[0] != b or q.shape[2] != sq or q.shape[3] == 0:
        raise ValueError(f"dsattn.{OP}: q must be [B={b}, H, Sq={sq}, Dqk > 0], got {tuple(q.shape)}")
    h, dqk = q.shape[1], q.shape[3]
    if k.shape[0] != b or k.shape[2] != sk or k.shape[3] != dqk:
        raise ValueError(f"dsattn.{OP}: k must be [B={b}, Hkv, Sk={sk}, Dqk={dqk}], got {tuple(k.shape)}")
    if k.shape[1] == 0 or h % k.shape[1] != 0:
        raise ValueError(f"dsattn.{OP}: k's heads ({k.shape[1]}) must divide q's heads ({h}) (GQA)")
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    if indices is not None:
        _check_indices(indices, b, sq, sk, q_idx)
    return _checks.check_scale(OP, scale, dqk**-0.5), _checks.check_scale(OP, index_scale, di**-0.5, name="index_scale")


def _check_indices(indices, b: int, sq: int, sk: int, q_idx) -> None:
    _checks.check_tensor(OP, "indices", indices, ndim=3, dtypes=_checks.INDEX_DTYPES)
    _checks.check_same_device(OP, q_idx=q_idx, indices=indices)
    if tuple(indices.shape[:2]) != (b, sq):
        raise ValueError(f"dsattn.{OP}: indices must be [B, Sq, topk] = {(b, sq, 'topk')}, got {tuple(indices.shape)}")
    # A host read: eager only. Under torch.compile / CUDA graph capture every backend treats entries outside
    # [-1, Sk) as -1 (clean_indices), so a bad index never reads outside k / k_idx.
    if torch.compiler.is_compiling() or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if indices.numel():
        low, high = (int(x) for x in torch.aminmax(indices))
        if low < -1 or high >= sk:
            raise ValueError(f"dsattn.{OP}: indices must lie in [-1, Sk={sk}) (-1 = no key), got values in "
                             f"[{low}, {high}]")


def _select(backend: str, q_idx, k_idx, weights, q) -> str:
    dtype = torch.promote_types(torch.promote_types(q_idx.dtype, k_idx.dtype), q.dtype)
    request = capabilities.Request(dtype=dtype, grad=_backend.needs_grad(q_idx, k_idx, weights),
                                   head_dim=q_idx.shape[3])
    return _backend.select_backend(OP, backend, q_idx.device, request, auto_order=AUTO_ORDER.get(q_idx.device.type))


def _options(scale, index_scale, causal):
    return dict(scale=scale, index_scale=index_scale, causal=causal)


def _indexer_kl_loss_fwd(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, q: torch.Tensor,
                         k: torch.Tensor, indices: torch.Tensor | None, scale: float, index_scale: float,
                         causal: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, the target's per-head log-sum-exp [B, H, Sq], the index scores' log-sum-exp [B, Sq])."""
    if backend == "triton":
        from dsattn.triton_kernels import indexer_kl_loss as _triton

        return _triton.indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, indices, **_options(scale, index_scale, causal))
    return _torch.indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, indices=indices,
                                      **_options(scale, index_scale, causal))


def _indexer_kl_loss(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, q: torch.Tensor,
                     k: torch.Tensor, indices: torch.Tensor | None, scale: float, index_scale: float, causal: bool,
                     backend: str) -> torch.Tensor:
    return _indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal, backend)[0]


def _indexer_kl_loss_bwd(grad: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor,
                         q: torch.Tensor, k: torch.Tensor, lse_s: torch.Tensor, lse_i: torch.Tensor,
                         indices: torch.Tensor | None, scale: float, index_scale: float, causal: bool,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from dsattn.triton_kernels import indexer_kl_loss as _triton

        return _triton.indexer_kl_loss_backward(grad, q_idx, k_idx, weights, q, k, indices, lse_s, lse_i,
                                                **_options(scale, index_scale, causal))
    return _torch.indexer_kl_loss_bwd(grad, q_idx, k_idx, weights, q, k, lse_s, lse_i, indices=indices,
                                      **_options(scale, index_scale, causal))


indexer_kl_loss_op = define_op(OP, _indexer_kl_loss)
indexer_kl_loss_fwd_op = define_op(OP + "_fwd", _indexer_kl_loss_fwd)
indexer_kl_loss_bwd_op = define_op(OP + "_bwd", _indexer_kl_loss_bwd)


def _setup_context(ctx, inputs, output):
    q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal, backend = inputs
    ctx.save_for_backward(q_idx, k_idx, weights, q, k, indices)
    ctx.options = (scale, index_scale, causal, backend)


def _backward(ctx, grad):
    # Reached when the public op is called directly (the functional entry takes the _fwd op when a gradient
    # is wanted, which saves the log-sum-exps): recompute them.
    q_idx, k_idx, weights, q, k, indices = ctx.saved_tensors
    _backend.check_backward(OP, ctx.options[-1])
    _, lse_s, lse_i = indexer_kl_loss_fwd_op(q_idx, k_idx, weights, q, k, indices, *ctx.options)
    dq, dk, dw = indexer_kl_loss_bwd_op(grad, q_idx, k_idx, weights, q, k, lse_s, lse_i, indices, *ctx.options)
    return dq, dk, dw, None, None, None, None, None, None, None


indexer_kl_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_fwd(ctx, inputs, output):
    q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal, backend = inputs
    _, lse_s, lse_i = output
    ctx.save_for_backward(q_idx, k_idx, weights, q, k, indices, lse_s, lse_i)
    ctx.options = (scale, index_scale, causal, backend)
    ctx.mark_non_differentiable(lse_s, lse_i)


def _backward_fwd(ctx, grad, grad_lse_s, grad_lse_i):
    q_idx, k_idx, weights, q, k, indices, lse_s, lse_i = ctx.saved_tensors
    _backend.check_backward(OP, ctx.options[-1])
    dq, dk, dw = indexer_kl_loss_bwd_op(grad, q_idx, k_idx, weights, q, k, lse_s, lse_i, indices, *ctx.options)
    return dq, dk, dw, None, None, None, None, None, None, None


indexer_kl_loss_fwd_op.register_autograd(_backward_fwd, setup_context=_setup_context_fwd)


def indexer_kl_loss(q_idx, k_idx, weights, q, k, *, indices=None, scale=None, index_scale=None, causal=True,
                    backend="auto"):
    """DeepSeek-V3.2's indexer loss: mean over the rows (b, i) that see a key of KL(p_i || softmax_j(I_i)).

    I[b,i,j] = sum_h weights[b,i,h] * relu(index_scale * q_idx[b,i,h,:] . k_idx[b,j,:]) (index_scale defaults
    to Di ** -0.5, as lightning_indexer_topk's scale); p[b,i,:] = mean over the H heads of
    softmax_j(scale * q[b,h,i,:] . k[b,h_kv(h),j,:]) (scale defaults to Dqk ** -0.5).
    q_idx [B, Sq, Hi, Di], k_idx [B, Sk, Di], weights [B, Sq, Hi], q [B, H, Sq, Dqk], k [B, Hkv, Sk, Dqk]
    (H % Hkv == 0, any strides). Row i sits at position i + Sk - Sq and, causal, sees keys j <= that position,
    else every key. indices None: the dense warm-up over all visible keys; indices [B, Sq, topk] int32/int64
    (-1 = no key; eager: entries outside [-1, Sk) are a ValueError): both distributions restricted to and
    renormalized over the listed visible keys, a key listed twice counted once. A row that sees no key adds
    nothing (0 when none does). Returns a scalar (float32; float64 for float64 q_idx).

    Gradients reach q_idx, k_idx and weights; q and k are the target, a constant (never a gradient).
    "torch": query and key chunks, two passes with an online log-sum-exp, memory O(chunk_q x chunk_k x
    max(H, Hi)); "triton": the same two passes as kernels, one query row per program, O(B x H x Sq) state
    (CUDA; fp16/bf16/fp32, index head dim Di up to 256, any Dqk). "auto": Triton on CUDA, torch on CPU and for
    float64. Neither holds [B, Sq, Sk].
    """
    scale, index_scale = _check_inputs(q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal)
    q, k = q.detach(), k.detach()
    chosen = _select(backend, q_idx, k_idx, weights, q)
    if _backend.needs_grad(q_idx, k_idx, weights):
        return indexer_kl_loss_fwd_op(q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal, chosen)[0]
    return indexer_kl_loss_op(q_idx, k_idx, weights, q, k, indices, scale, index_scale, causal, chosen)
