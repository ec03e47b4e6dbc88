"""sliding_window_attention[_varlen]: the custom ops torch.ops.dsattn.sliding_window_attention[_varlen] and
their functional entries (validate, pick a backend from dsattn.capabilities, call the op)."""

from typing import Optional

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.torch_backend import sliding_window_attention as _torch

OP = "sliding_window_attention"
OP_VARLEN = "sliding_window_attention_varlen"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _check_window_and_flags(op: str, window, causal) -> int:
    window = _checks.check_int(op, "window", window, minimum=1)
    if not isinstance(causal, bool):
        raise TypeError(f"dsattn.{op}: causal must be a bool, got {type(causal).__name__}")
    return window


def _check_sinks(op: str, sinks, heads_q: int, q: torch.Tensor):
    if sinks is None:
        return None
    _checks.check_tensor(op, "sinks", sinks, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if sinks.shape[0] != heads_q:
        raise ValueError(
            f"dsattn.{op}: sinks must have shape [{heads_q}] (one logit per q head), got {tuple(sinks.shape)}"
        )
    _checks.check_same_device(op, q=q, sinks=sinks)
    return sinks


def _select(op: str, backend: str, q, k, v, sinks, dim_qk: int, dim_v: int) -> str:
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k, v, sinks),
                                   head_dim=max(dim_qk, dim_v), offset=capabilities.max_offset(q, k, v))
    return _backend.select_backend(op, backend, q.device, request, auto_order=AUTO_ORDER.get(q.device.type))


def _sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool,
                              scale: float, sinks: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import sliding_window_attention as _triton

        return _triton.sliding_window_attention(q, k, v, window, causal, scale, _triton_sinks(sinks))
    if backend == "cpp":
        return torch.ops.dsattn_C.sliding_window_attention(q, k, v, _triton_sinks(sinks), None, None, window, causal,
                                                           scale)
    return _torch.sliding_window_attention(q, k, v, window, causal=causal, scale=scale, sinks=sinks)


sliding_window_attention_op = define_op(OP, _sliding_window_attention)


def _triton_sinks(sinks):
    return None if sinks is None else sinks.to(torch.float32).contiguous()


def _sliding_window_attention_fwd_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool,
                                      scale: float, sinks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's training forward: (out, the rows' base-2 log-sum-exp fp32 [B, Hq, Sq]); internal (the public
    op returns only out), so that the backward reuses the forward's lse instead of recomputing it."""
    from dsattn.triton_kernels import sliding_window_attention as _triton

    return _triton.sliding_window_attention_fwd_lse(q, k, v, window, causal, scale, _triton_sinks(sinks))


sliding_window_attention_fwd_lse_op = define_op(OP + "_fwd_lse", _sliding_window_attention_fwd_lse)


def _sliding_window_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, window: int, causal: bool, scale: float,
                                  sinks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """Triton's backward as an op of its own, so that AOTAutograd traces it as one call (dsinks: zeros [Hq]
    without sinks)."""
    from dsattn.triton_kernels import sliding_window_attention as _triton

    dq, dk, dv, dsinks = _triton.sliding_window_attention_backward(
        grad_out.to(q.dtype), q, k, v, out, lse, window, causal, scale, _triton_sinks(sinks))
    if dsinks is None:
        return dq, dk, dv, q.new_zeros(q.shape[1], dtype=torch.float32)
    return dq, dk, dv, dsinks.to(sinks.dtype)


sliding_window_attention_bwd_op = define_op(OP + "_bwd", _sliding_window_attention_bwd)


def _triton_backward(grad_out, q, k, v, sinks, out, lse, window, causal, scale):
    dq, dk, dv, dsinks = sliding_window_attention_bwd_op(grad_out, q, k, v, out, lse, window, causal, scale, sinks)
    return dq, dk, dv, None if sinks is None else dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, window, causal, scale, sinks, backend = inputs
    ctx.save_for_backward(q, k, v, sinks)
    ctx.options = dict(window=window, causal=causal, scale=scale)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k, v, sinks = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    if ctx.backend == "triton":
        # Reached when the public op is called directly with backend="triton" (the functional entry takes
        # the _fwd_lse op instead, which saves lse): recompute (out, lse) with the training forward.
        o = ctx.options
        out, lse = sliding_window_attention_fwd_lse_op(q, k, v, o["window"], o["causal"], o["scale"], sinks)
        dq, dk, dv, dsinks = _triton_backward(grad_out, q, k, v, sinks, out, lse, **ctx.options)
    else:
        dq, dk, dv, dsinks = _torch.sliding_window_attention_backward(grad_out, q, k, v, sinks=sinks, **ctx.options)
    return dq, dk, dv, None, None, None, dsinks, None


sliding_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_fwd_lse(ctx, inputs, output):
    q, k, v, window, causal, scale, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse)
    ctx.options = dict(window=window, causal=causal, scale=scale)
    ctx.mark_non_differentiable(lse)


def _backward_fwd_lse(ctx, grad_out, grad_lse):
    q, k, v, sinks, out, lse = ctx.saved_tensors
    dq, dk, dv, dsinks = _triton_backward(grad_out, q, k, v, sinks, out, lse, **ctx.options)
    return dq, dk, dv, None, None, None, dsinks


sliding_window_attention_fwd_lse_op.register_autograd(_backward_fwd_lse, setup_context=_setup_context_fwd_lse)


def sliding_window_attention(q, k, v, window, *, causal=True, scale=None, sinks=None, backend="auto"):
    """Sliding-window softmax attention.

    q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (any strides, Hq % Hkv == 0) -> [B, Hq, Sq, Dv]
    in q's dtype. Query i sits at position p = i + Sk - Sq. causal=True: key j is visible iff
    p - window < j <= p (window >= Sk is full causal attention). causal=False: the symmetric window
    |p - j| < window. scale defaults to Dqk ** -0.5. sinks: optional [Hq] logits (gpt-oss / DeepSeek-V4
    `s_aux`) added to every row's softmax denominator as e^(sink - m), with no value. A row that sees no key
    (only possible when Sq > Sk) outputs zeros.

    Backends: "triton" (CUDA; fp16/bf16/fp32, head dims up to 256, flash-decoding split-K when
    groups x Sq <= 64, 16 in fp32, without a gradient; a FlashAttention-2 style backward), "cpp" (CPU,
    dsattn._C; fp16/bf16/fp32, any head dims, flash-style forward over the window's key tiles only, no
    backward), "torch" (the chunked reference, O(S x window) memory). "auto": Triton on CUDA; on CPU cpp when
    no gradient is needed, else the reference; the reference for what the kernels do not take (float64, wider
    heads such as MLA 576/512 on CUDA).
    """
    window = _check_window_and_flags(OP, window, causal)
    shape = _checks.check_qkv(OP, q, k, v)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    sinks = _check_sinks(OP, sinks, shape.heads_q, q)
    chosen = _select(OP, backend, q, k, v, sinks, shape.dim_qk, shape.dim_v)
    if chosen == "triton" and _backend.needs_grad(q, k, v, sinks):
        return sliding_window_attention_fwd_lse_op(q, k, v, window, causal, scale, sinks)[0]
    return sliding_window_attention_op(q, k, v, window, causal, scale, sinks, chosen)


def _check_cu_seqlens(op: str, name: str, cu, device, total: int) -> None:
    _checks.check_tensor(op, name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.device != device:
        raise ValueError(f"dsattn.{op}: {name} is on {cu.device} but q is on {device}")
    if cu.shape[0] < 1:
        raise ValueError(f"dsattn.{op}: {name} must hold at least one offset (0)")
    if torch.compiler.is_compiling():
        return  # value checks read the offsets on the host: eager only (a traced read is a graph break)
    values = cu.cpu()  # one small sync: bad offsets would make the kernel read out of bounds
    if values[0].item() != 0 or values[-1].item() != total:
        raise ValueError(f"dsattn.{op}: {name} must start at 0 and end at the token count {total}, "
                         f"got {values[0].item()} .. {values[-1].item()}")
    if (values[1:] < values[:-1]).any():
        raise ValueError(f"dsattn.{op}: {name} must be non-decreasing")


def sliding_window_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, *,
    causal=True, scale=None, sinks=None, backend="auto",
):
    """Sliding-window attention over packed sequences (no padding).

    q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv]; cu_seqlens_q / cu_seqlens_k int32
    [num_seqs + 1] prefix offsets (sequence s owns q rows cu_seqlens_q[s]:cu_seqlens_q[s+1] and the matching
    k/v rows); max_seqlen_q / max_seqlen_k must be >= every sequence's length (they size the kernel grid).
    Within a sequence the semantics are sliding_window_attention's (its queries at the end of its keys);
    sequences never see each other. A query row of a sequence with no visible key (e.g. no keys) outputs
    zeros. Returns [total_q, Hq, Dv] in q's dtype. Backends as sliding_window_attention's; Triton's backward
    runs the same kernels over the packed tensors.
    """
    op = OP_VARLEN
    window = _check_window_and_flags(op, window, causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(op, name, t, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(op, q=q, k=k, v=v)
    _checks.check_same_dtype(op, q=q, k=k, v=v)
    total_q, hq, dqk = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    if v.shape[0] != total_k or v.shape[1] != hkv:
        raise ValueError(
            f"dsattn.{op}: k and v must agree on tokens and heads, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[2] != dqk:
        raise ValueError(f"dsattn.{op}: k head dim {k.shape[2]} must equal q head dim {dqk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"dsattn.{op}: q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA)")
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.device, total_q)
    _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q.device, total_k)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"dsattn.{op}: cu_seqlens_q and cu_seqlens_k must have the same length (one offset per "
                         f"sequence + 1), got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    max_seqlen_q = _checks.check_int(op, "max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = _checks.check_int(op, "max_seqlen_k", max_seqlen_k, minimum=0)
    for name, cu, bound in (("max_seqlen_q", cu_seqlens_q, max_seqlen_q), ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
        if torch.compiler.is_compiling():
            break  # host read of the offsets: checked in eager mode only
        longest = int((cu[1:] - cu[:-1]).max().item()) if cu.shape[0] > 1 else 0
        if longest > bound:
            raise ValueError(f"dsattn.{op}: {name}={bound} is shorter than the longest sequence ({longest})")
    scale = _checks.check_scale(op, scale, dqk**-0.5)
    sinks = _check_sinks(op, sinks, hq, q)
    chosen = _select(op, backend, q, k, v, sinks, dqk, v.shape[2])
    if chosen == "triton" and _backend.needs_grad(q, k, v, sinks):
        return sliding_window_attention_varlen_fwd_lse_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                          max_seqlen_k, window, causal, scale, sinks)[0]
    return sliding_window_attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal,
                                              scale, sinks, chosen)


def _sliding_window_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, window: int, causal: bool,
                                     scale: float, sinks: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import sliding_window_attention as _triton

        return _triton.sliding_window_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal, scale,
            _triton_sinks(sinks))
    if backend == "cpp":
        return torch.ops.dsattn_C.sliding_window_attention(q, k, v, _triton_sinks(sinks), cu_seqlens_q, cu_seqlens_k,
                                                           window, causal, scale)
    return _torch.sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, window, causal=causal,
                                                  scale=scale, sinks=sinks)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal, scale, sinks, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


# Opaque: the torch backend reads the offsets on the host.
sliding_window_attention_varlen_op = define_op(OP_VARLEN, _sliding_window_attention_varlen, fake=_varlen_fake)


def _sliding_window_attention_varlen_fwd_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                             cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                             max_seqlen_q: int, max_seqlen_k: int, window: int, causal: bool,
                                             scale: float, sinks: Optional[torch.Tensor]
                                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's varlen training forward: (out, lse fp32 [Hq, total_q]); max_seqlen_k only sizes the
    backward's grid (kept here so that the backward needs no host read of the offsets)."""
    from dsattn.triton_kernels import sliding_window_attention as _triton

    return _triton.sliding_window_attention_varlen_fwd_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                           window, causal, scale, _triton_sinks(sinks))


sliding_window_attention_varlen_fwd_lse_op = define_op(OP_VARLEN + "_fwd_lse", _sliding_window_attention_varlen_fwd_lse)


def _sliding_window_attention_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                                         max_seqlen_k: int, window: int, causal: bool, scale: float,
                                         sinks: Optional[torch.Tensor]
                                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's varlen backward as one op (dsinks: zeros [Hq] without sinks), as the padded one."""
    from dsattn.triton_kernels import sliding_window_attention as _triton

    dq, dk, dv, dsinks = _triton.sliding_window_attention_varlen_backward(
        grad_out.to(q.dtype), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window,
        causal, scale, _triton_sinks(sinks))
    if dsinks is None:
        return dq, dk, dv, q.new_zeros(q.shape[1], dtype=torch.float32)
    return dq, dk, dv, dsinks.to(sinks.dtype)


sliding_window_attention_varlen_bwd_op = define_op(OP_VARLEN + "_bwd", _sliding_window_attention_varlen_bwd)


def _triton_backward_varlen(grad_out, q, k, v, sinks, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, window, causal, scale):
    dq, dk, dv, dsinks = sliding_window_attention_varlen_bwd_op(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, causal, scale,
        sinks)
    return dq, dk, dv, None if sinks is None else dsinks


def _setup_context_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal, scale, sinks, backend = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks)
    ctx.options = dict(window=window, causal=causal, scale=scale)
    ctx.max_seqlen_q = max_seqlen_q
    ctx.backend = backend


def _backward_varlen(ctx, grad_out):
    q, k, v, cu_seqlens_q, cu_seqlens_k, sinks = ctx.saved_tensors
    _backend.check_backward(OP_VARLEN, ctx.backend)
    if ctx.backend == "triton":
        # The public op called directly (the functional entry takes the _fwd_lse op, which saves lse and
        # max_seqlen_k): recompute (out, lse). No max_seqlen_k here: the key count bounds it (idle key blocks
        # past a sequence's end cost a launch, not a host read of the offsets, which would not trace).
        args = (cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, k.shape[0])
        o = ctx.options
        out, lse = sliding_window_attention_varlen_fwd_lse_op(q, k, v, *args, o["window"], o["causal"], o["scale"],
                                                              sinks)
        dq, dk, dv, dsinks = _triton_backward_varlen(grad_out, q, k, v, sinks, out, lse, *args, **ctx.options)
    else:
        dq, dk, dv, dsinks = _torch.sliding_window_attention_varlen_backward(
            grad_out, q, k, v, cu_seqlens_q, cu_seqlens_k, sinks=sinks, **ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, dsinks, None


sliding_window_attention_varlen_op.register_autograd(_backward_varlen, setup_context=_setup_context_varlen)


def _setup_context_varlen_fwd_lse(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, causal, scale, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window=window, causal=causal,
                       scale=scale)
    ctx.mark_non_differentiable(lse)


def _backward_varlen_fwd_lse(ctx, grad_out, grad_lse):
    q, k, v, sinks, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv, dsinks = _triton_backward_varlen(grad_out, q, k, v, sinks, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                 **ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, dsinks


sliding_window_attention_varlen_fwd_lse_op.register_autograd(_backward_varlen_fwd_lse,
                                                             setup_context=_setup_context_varlen_fwd_lse)
