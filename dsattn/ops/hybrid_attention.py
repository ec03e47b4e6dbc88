"""hybrid_attention: the custom op torch.ops.dsattn.hybrid_attention and its functional entry (validate, pick
a backend from dsattn.capabilities, call the op). Exact softmax on the first `prefix` and the last `window`
keys of each query, linear attention over the other visible keys, one shared normalizer (SPEC; semantics and
edge cases in dsattn.reference.hybrid_attention)."""

import torch

from dsattn import _backend, _checks, _ext, capabilities
from dsattn._library import define_op
from dsattn.reference.linear_attention import FEATURE_MAPS
from dsattn.torch_backend import hybrid_attention as _torch

OP = "hybrid_attention"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
# The cpp kernel's feature_map codes (csrc/cpu/attention_kernels.h, HybridFeatureMap); "exp" (whose far state
# needs shifts that cancel) stays on torch.
CPP_FEATURE_MAPS = {"elu": 0, "relu": 1, "identity": 2}


def _check_feature_map(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dsattn.{OP}: feature_map must be a str, got {type(name).__name__}")
    if name not in FEATURE_MAPS:
        raise ValueError(f"dsattn.{OP}: feature_map must be one of {tuple(FEATURE_MAPS)}, got {name!r}")
    return name


def _hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, window: int, feature_map: str,
                      scale: float, backend: str) -> torch.Tensor:
    if backend == "triton":
        from dsattn.triton_kernels import hybrid_attention as _triton

        return _triton.hybrid_attention(q, k, v, prefix=prefix, window=window, feature_map=feature_map, scale=scale)
    if backend == "cpp":
        return torch.ops.dsattn_C.hybrid_attention(q, k, v, prefix, window, CPP_FEATURE_MAPS[feature_map], scale)
    return _torch.hybrid_attention(q, k, v, prefix=prefix, window=window, feature_map=feature_map, scale=scale)


hybrid_attention_op = define_op(OP, _hybrid_attention)

def _hybrid_attention_fwd_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, window: int,
                                feature_map: str, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's training forward: (out, per-row stats fp32 [B, Hq, Sq, 3], amax int32 [B, Hq, Sq]); internal
    (the public op returns only out), so that the backward recomputes the weights from the forward's rows."""
    from dsattn.triton_kernels import hybrid_attention as _triton

    return _triton.hybrid_attention_fwd_stats(q, k, v, prefix=prefix, window=window, feature_map=feature_map,
                                              scale=scale)


hybrid_attention_fwd_stats_op = define_op(OP + "_fwd_stats", _hybrid_attention_fwd_stats)


def _hybrid_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          stats: torch.Tensor, amax: torch.Tensor, prefix: int, window: int, feature_map: str,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's backward as an op of its own, so that AOTAutograd traces it as one call."""
    from dsattn.triton_kernels import hybrid_attention as _triton

    return _triton.hybrid_attention_backward(grad_out, q, k, v, out, stats, amax, prefix=prefix, window=window,
                                             feature_map=feature_map, scale=scale)


hybrid_attention_bwd_op = define_op(OP + "_bwd", _hybrid_attention_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix, window, feature_map, scale, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.options = dict(prefix=prefix, window=window, feature_map=feature_map, scale=scale)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    o = ctx.options
    if ctx.backend == "triton":
        # Reached when the public op is called directly with backend="triton" (the functional entry takes the
        # _fwd_stats op instead): recompute (out, stats) with the training forward.
        out, stats, amax = hybrid_attention_fwd_stats_op(q, k, v, o["prefix"], o["window"], o["feature_map"],
                                                         o["scale"])
        dq, dk, dv = hybrid_attention_bwd_op(grad_out, q, k, v, out, stats, amax, o["prefix"], o["window"],
                                             o["feature_map"], o["scale"])
    else:
        dq, dk, dv = _torch.hybrid_attention_backward(grad_out, q, k, v, **o)
    return dq, dk, dv, None, None, None, None, None


hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_fwd_stats(ctx, inputs, output):
    q, k, v, prefix, window, feature_map, scale = inputs
    out, stats, amax = output
    ctx.save_for_backward(q, k, v, out, stats, amax)
    ctx.options = (prefix, window, feature_map, scale)
    ctx.mark_non_differentiable(stats, amax)


def _backward_fwd_stats(ctx, grad_out, grad_stats, grad_amax):
    q, k, v, out, stats, amax = ctx.saved_tensors
    dq, dk, dv = hybrid_attention_bwd_op(grad_out, q, k, v, out, stats, amax, *ctx.options)
    return dq, dk, dv, None, None, None, None


hybrid_attention_fwd_stats_op.register_autograd(_backward_fwd_stats, setup_context=_setup_context_fwd_stats)


def hybrid_attention(q, k, v, *, prefix=2048, window=0, feature_map="elu", scale=None, backend="auto"):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (any strides, Hq % Hkv == 0) ->
    [B, Hq, Sq, Dv] in q's dtype. Causal; query i sits at position i + Sk - Sq. prefix >= 0 and window >= 0
    keys are exact (window = 0: no band); prefix >= Sk is causal softmax attention.

    Backends: "triton" (CUDA; fp16/bf16/fp32, head dims up to 256; a backward that recomputes the weights from
    per-row statistics, FlashAttention-2 style for the exact keys and by chunk states for the far keys), "torch"
    (chunked over queries, O(chunk x (prefix + window)) memory, with a backward), "cpp" (CPU, forward only:
    fp32/fp16/bf16 with fp32 accumulation, feature maps elu / relu / identity; per block of query rows the exact
    keys by online softmax over packed K/V tiles and the far keys by a running phi(K)^T V state). "auto": Triton
    on CUDA, cpp on CPU without a gradient, the torch backend for the rest (a gradient, "exp", float64, wider
    heads on CUDA)."""
    shape = _checks.check_qkv(OP, q, k, v)
    prefix = _checks.check_int(OP, "prefix", prefix, minimum=0)
    window = _checks.check_int(OP, "window", window, minimum=0)
    feature_map = _check_feature_map(feature_map)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k, v),
                                   head_dim=max(shape.dim_qk, shape.dim_v), offset=capabilities.max_offset(q, k, v))
    auto_order = AUTO_ORDER.get(q.device.type)
    if feature_map not in CPP_FEATURE_MAPS and auto_order is not None:
        auto_order = tuple(b for b in auto_order if b != "cpp")
    chosen = _backend.select_backend(OP, backend, q.device, request, auto_order=auto_order)
    if chosen == "cpp":
        if feature_map not in CPP_FEATURE_MAPS:
            raise ValueError(f"dsattn.{OP}: backend='cpp' takes feature_map {tuple(CPP_FEATURE_MAPS)}, got "
                             f"{feature_map!r}; use backend='auto' or 'torch'")
    # int32 arithmetic inside the kernel; the clamp keeps "prefix = everything" values like 2**40 harmless
    prefix, window = min(prefix, shape.seq_k + 1), min(window, shape.seq_k + 1)
    if chosen == "triton" and request.grad:
        return hybrid_attention_fwd_stats_op(q, k, v, prefix, window, feature_map, scale)[0]
    return hybrid_attention_op(q, k, v, prefix, window, feature_map, scale, chosen)
