"""sparse_attention: the custom op torch.ops.dsattn.sparse_attention and its functional entry (validate, pick
a backend from dsattn.capabilities, call the op). Each query attends to exactly the keys its `indices` row
lists (DeepSeek-V3.2 DSA).

Semantics (SPEC): indices int32 or int64, [B, Sq, topk] (shared by every head) or [B, Hkv, Sq, topk]; -1 is
"no key"; with causal=True listed keys after the query's position (i + Sk - Sq) are skipped; a duplicated
index is attended once per listing (gather semantics; DeepSeek's indexer never emits duplicates); a row with
no valid key outputs zeros. Any index outside [-1, Sk) is a ValueError.

The range check reads indices.aminmax() back to the host: one device sync per eager call. Under torch.compile
and CUDA graph capture it is skipped (no sync there); every backend then treats out-of-range entries as -1
(the kernel masks them, the torch backend and int64 -> int32 conversion map them to "no key"), so a bad
index never reads outside k/v. Gradients reach q, k and v (indices are not differentiable): -1 and causally
skipped entries contribute nothing, a key listed twice gets both listings' gradients.
"""

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.torch_backend import sparse_attention as _torch

OP = "sparse_attention"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


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
    # A host read: eager only (see the module docstring for what holds without it).
    if torch.compiler.is_compiling() or (indices.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if indices.numel():
        low, high = (int(x) for x in torch.aminmax(indices))
        if low < -1 or high >= shape.seq_k:
            raise ValueError(
                f"dsattn.{OP}: indices must lie in [-1, Sk={shape.seq_k}) (-1 = no key), got values in [{low}, {high}]"
            )


def _select(backend: str, q, k, v) -> str:
    # No offset in the request: the Triton kernel switches to 64-bit offsets where they can pass int32.
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k, v))
    return _backend.select_backend(OP, backend, q.device, request, auto_order=AUTO_ORDER.get(q.device.type))


def _triton_indices(indices: torch.Tensor, seq_k: int) -> torch.Tensor:
    if indices.dtype != torch.int32:  # int64 entries outside [-1, Sk) must not wrap into range
        indices = torch.where((indices < -1) | (indices >= seq_k), -1, indices).to(torch.int32)
    return indices


def _head_rows(t: torch.Tensor) -> torch.Tensor:
    """K or V with each head's rows packed (an O(Sk x D) copy where they are not): the cpp kernel gathers listed
    rows, and rows far apart at a power-of-two stride (V split out of MLA's fused kv_b_proj output, rows
    H x (dn + dv) apart) fall into the same cache sets."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def _sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, causal: bool,
                      scale: float, backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import sparse_attention as _triton

        return _triton.sparse_attention(q, k, v, _triton_indices(indices, k.shape[2]), causal=causal, scale=scale)
    if backend == "cpp":  # skips entries outside [0, Sk) itself, int32 or int64
        return torch.ops.dsattn_C.sparse_attention(q, _head_rows(k), _head_rows(v), indices, causal, scale)
    return _torch.sparse_attention(q, k, v, indices, causal=causal, scale=scale)


sparse_attention_op = define_op(OP, _sparse_attention)


def _sparse_attention_fwd_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, causal: bool,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's training forward: (out, the rows' base-2 log-sum-exp fp32 [B, Hq, Sq]); internal (the public
    op returns only out), so that the backward reuses the forward's lse instead of recomputing it."""
    from dsattn.triton_kernels import sparse_attention as _triton

    return _triton.sparse_attention_fwd_lse(q, k, v, _triton_indices(indices, k.shape[2]), causal=causal, scale=scale)


sparse_attention_fwd_lse_op = define_op(OP + "_fwd_lse", _sparse_attention_fwd_lse)


def _sparse_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          indices: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's backward as an op of its own, so that AOTAutograd traces it as one call. Also the backward of
    topk_sparse_attention's Triton path (per-query-head lists over per-query-head K/V)."""
    from dsattn.triton_kernels import sparse_attention as _triton

    return _triton.sparse_attention_backward(grad_out.to(q.dtype), q, k, v, _triton_indices(indices, k.shape[2]),
                                             out, lse, causal=causal, scale=scale)


sparse_attention_bwd_op = define_op(OP + "_bwd", _sparse_attention_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, indices)
    ctx.options = dict(causal=causal, scale=scale)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k, v, indices = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    if ctx.backend == "triton":
        # Reached when the public op is called directly with backend="triton" (the functional entry takes
        # the _fwd_lse op instead, which saves lse): recompute (out, lse) with the training forward.
        causal, scale = ctx.options["causal"], ctx.options["scale"]
        out, lse = sparse_attention_fwd_lse_op(q, k, v, indices, causal, scale)
        dq, dk, dv = sparse_attention_bwd_op(grad_out, q, k, v, indices, out, lse, causal, scale)
    else:
        dq, dk, dv = _torch.sparse_attention_backward(grad_out, q, k, v, indices, **ctx.options)
    return dq, dk, dv, None, None, None, None


sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_fwd_lse(ctx, inputs, output):
    q, k, v, indices, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.options = (causal, scale)
    ctx.mark_non_differentiable(lse)


def _backward_fwd_lse(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    dq, dk, dv = sparse_attention_bwd_op(grad_out, q, k, v, indices, out, lse, *ctx.options)
    return dq, dk, dv, None, None, None


sparse_attention_fwd_lse_op.register_autograd(_backward_fwd_lse, setup_context=_setup_context_fwd_lse)


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
    indices [B, Sq, topk] or [B, Hkv, Sq, topk], int32 (int64 accepted). Returns [B, Hq, Sq, Dv] in q's
    dtype. Cost O(Sq x topk x D); no O(Sq x Sk) tensor.

    Backends: "triton" (CUDA; fp16/bf16/fp32, any head dims, split-K for decode; a FlashAttention-2 style
    backward over the listed keys, dk/dv by fp32 atomics), "cpp" (CPU, dsattn._C; fp16/bf16/fp32, a gather
    of each row's listed K/V shared by the KV group's heads, online softmax; no backward), "torch" (chunked,
    "gather" or "dense" per call shape; has a backward). "auto": Triton on CUDA; on CPU cpp when no gradient
    is needed, else torch; torch for float64.
    """
    shape = _checks.check_qkv(OP, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{OP}: causal must be a bool, got {type(causal).__name__}")
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    _check_indices(indices, shape, q)
    chosen = _select(backend, q, k, v)
    if chosen == "triton" and _backend.needs_grad(q, k, v):
        return sparse_attention_fwd_lse_op(q, k, v, indices, causal, scale)[0]
    return sparse_attention_op(q, k, v, indices, causal, scale, chosen)
