"""linear_attention: kernelized attention with a running state (SPEC).

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = sum_{j<=i} phi(k_j)^T v_j,   z_i = sum_{j<=i} phi(k_j)

No scale is applied (SPEC gives none; scale q yourself if you want one — with "elu"/"exp" that changes phi,
not just the output). Without `normalize` the division is dropped; non-causal sums over every key. Feature
maps are defined in dsattn.reference.linear_attention; "exp" is exactly exp(x), kept finite by shifts that
cancel (dsattn.torch_backend.linear_attention). Causal with Sq < Sk: query i sits at position i + Sk - Sq
(the keys before the first query only feed the state); Sq > Sk is an error.

The state `LinearAttentionState(S [B, Hq, Dk, Dv], z [B, Hq, Dk], m)`, float32 (float64 for float64 inputs),
covers every key seen: pass a call's final state as the next call's `initial_state` and two halves equal
the whole. For "exp", S and z are stored scaled by exp(-m), m [B, Hq, Dk] the running max of the keys per
feature dim (`state.unscaled()` gives the sums; m is not differentiated); for the other maps m is None. A
state without m (or a (S, z) tuple) is unscaled. dsattn.cache.LinearAttentionCache keeps it per layer.
"""

from typing import Optional

import torch

from dsattn import _backend, _checks, capabilities
from dsattn._library import define_op
from dsattn.reference.linear_attention import FEATURE_MAPS, LinearAttentionState
from dsattn.torch_backend import linear_attention as _torch

OP = "linear_attention"
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
# The cpp kernel's feature_map codes (csrc/cpu/linear_attention.cpp); "exp" (a shifted state) stays on torch.
CPP_FEATURE_MAPS = {"elu": 0, "relu": 1, "identity": 2}


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"dsattn.{OP}: {name} must be a bool, got {type(value).__name__}")


def _check_state(initial_state, shape: _checks.AttentionShape, q: torch.Tensor) -> LinearAttentionState | None:
    if initial_state is None:
        return None
    if not isinstance(initial_state, tuple) or len(initial_state) not in (2, 3):
        raise TypeError(
            f"dsattn.{OP}: initial_state must be a LinearAttentionState(S, z, m) (or a (S, z) tuple), "
            f"got {type(initial_state).__name__}"
        )
    S, z, m = LinearAttentionState(*initial_state)
    dtypes = (torch.float32, torch.float64)
    _checks.check_tensor(OP, "initial_state.S", S, ndim=4, dtypes=dtypes)
    _checks.check_tensor(OP, "initial_state.z", z, ndim=3, dtypes=dtypes)
    _checks.check_same_device(OP, q=q, **{"initial_state.S": S, "initial_state.z": z})
    if m is not None:
        _checks.check_tensor(OP, "initial_state.m", m, ndim=3, dtypes=dtypes)
        _checks.check_same_device(OP, q=q, **{"initial_state.m": m})
    expected_S = (shape.batch, shape.heads_q, shape.dim_qk, shape.dim_v)
    expected_z = (shape.batch, shape.heads_q, shape.dim_qk)
    if tuple(S.shape) != expected_S:
        raise ValueError(f"dsattn.{OP}: initial_state.S must be [B, Hq, Dk, Dv] = {expected_S}, got {tuple(S.shape)}")
    if tuple(z.shape) != expected_z:
        raise ValueError(f"dsattn.{OP}: initial_state.z must be [B, Hq, Dk] = {expected_z}, got {tuple(z.shape)}")
    if m is not None and tuple(m.shape) != expected_z:
        raise ValueError(f"dsattn.{OP}: initial_state.m must be [B, Hq, Dk] = {expected_z}, got {tuple(m.shape)}")
    return LinearAttentionState(S, z, m)


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: Optional[torch.Tensor],
                      z0: Optional[torch.Tensor], m0: Optional[torch.Tensor], feature_map: str, causal: bool,
                      normalize: bool, eps: float, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, S, z, m): the final state is always returned (it costs one state write); the entry drops it when
    not asked for. m (the "exp" map's shift of S and z, not differentiated) is zeros for the other maps."""
    if backend == "triton":
        from dsattn.triton_kernels import linear_attention as _triton

        initial = None if S0 is None else tuple(None if t is None else t.to(torch.float32) for t in (S0, z0, m0))
        o, (S, z, m) = _triton.linear_attention(q, k, v, feature_map=feature_map, causal=causal,
                                                normalize=normalize, eps=eps, initial_state=initial,
                                                output_final_state=True)
    elif backend == "cpp":
        state = (None, None) if S0 is None else (S0.to(torch.float32).contiguous(), z0.to(torch.float32).contiguous())
        o, S, z = torch.ops.dsattn_C.linear_attention(q, k, v, *state, CPP_FEATURE_MAPS[feature_map], causal,
                                                      normalize, eps)
        m = None
    else:
        o, S, z, m = _torch.linear_attention(q, k, v, S0, z0, m0, feature_map=feature_map, causal=causal,
                                             normalize=normalize, eps=eps)
    return o, S, z, torch.zeros_like(z) if m is None else m


linear_attention_op = define_op(OP, _linear_attention)


def _linear_attention_bwd(grad_o: torch.Tensor, grad_S: Optional[torch.Tensor], grad_z: Optional[torch.Tensor],
                          q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], feature_map: str, causal: bool,
                          normalize: bool, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's backward (maps other than "exp") as an op of its own, so that AOTAutograd traces it as one
    call: (dq, dk, dv, dS0, dz0), the last two fp32 even without an initial state."""
    from dsattn.triton_kernels import linear_attention as _triton

    return _triton.linear_attention_backward(grad_o, grad_S, grad_z, q, k, v, o, S0, z0, feature_map=feature_map,
                                             causal=causal, normalize=normalize, eps=eps)


linear_attention_bwd_op = define_op(OP + "_bwd", _linear_attention_bwd)


def _setup_context(ctx, inputs, output):
    q, k, v, S0, z0, m0, feature_map, causal, normalize, eps, backend = inputs
    ctx.save_for_backward(q, k, v, S0, z0, m0, output[0])
    ctx.mark_non_differentiable(output[3])
    ctx.options = dict(feature_map=feature_map, causal=causal, normalize=normalize, eps=eps)
    ctx.backend = backend


def _backward(ctx, grad_o, grad_S, grad_z, grad_m):
    q, k, v, S0, z0, m0, o = ctx.saved_tensors
    _backend.check_backward(OP, ctx.backend)
    if ctx.backend == "triton" and ctx.options["feature_map"] != "exp":
        dq, dk, dv, dS0, dz0 = linear_attention_bwd_op(grad_o, grad_S, grad_z, q, k, v, o, S0, z0,
                                                       *ctx.options.values())
        if S0 is None:
            dS0 = dz0 = None
        else:
            dS0, dz0 = dS0.to(S0.dtype), dz0.to(z0.dtype)
    else:
        # The torch backward recomputes from the inputs alone, whichever backend ran the forward: it serves
        # the "exp" map (whose scaled state the Triton backward does not carry).
        dq, dk, dv, dS0, dz0 = _torch.linear_attention_backward(grad_o, grad_S, grad_z, q, k, v, S0, z0, m0,
                                                                **ctx.options)
    return dq, dk, dv, dS0, dz0, None, None, None, None, None, None


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state=None,
    output_final_state: bool = False,
    backend: str = "auto",
):
    """Linear attention of q [B, Hq, Sq, Dk] over k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv] (any strides,
    Hq % Hkv == 0). Returns o [B, Hq, Sq, Dv] in q's dtype, or (o, LinearAttentionState) when
    output_final_state (for "exp" stored scaled: see the module doc). O(S x Dk x Dv) time, O(Dk x Dv)
    state; no [S, S] tensor. Gradients flow through q, k, v and initial_state's S and z, and back from o and
    the final state's S and z.

    Backends: "triton" (CUDA; fp16/bf16/fp32, Dk up to 256; chunked, segmented and recurrent decode kernels;
    a chunked backward: a forward walk for dq, a reverse one for dk, dv and the initial state's gradient,
    except for "exp", whose backward is the torch backend's), "cpp" (CPU, forward only: fp32/fp16/bf16 with an
    fp32 state, feature maps elu / relu / identity; chunks of 64 rows per (batch, head) task, a one-pass
    decode step), "torch" (chunked over the sequence with a carried state, with a backward). "auto": Triton
    on CUDA, cpp on CPU without a gradient, the torch backend for the rest (a gradient, "exp", float64, wider
    heads on CUDA)."""
    shape = _checks.check_qkv(OP, q, k, v)
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"dsattn.{OP}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    _check_bool("causal", causal)
    _check_bool("normalize", normalize)
    _check_bool("output_final_state", output_final_state)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"dsattn.{OP}: eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"dsattn.{OP}: eps must be >= 0, got {eps}")
    if causal and shape.seq_q > shape.seq_k:
        raise ValueError(
            f"dsattn.{OP}: causal needs Sq <= Sk (query i sits at position i + Sk - Sq), got q length "
            f"{shape.seq_q} and k length {shape.seq_k}"
        )
    state = _check_state(initial_state, shape, q)

    if state is not None and state.m is not None and feature_map != "exp":
        state = state.unscaled()  # only "exp" keeps its state scaled
    S0, z0, m0 = (None, None, None) if state is None else state
    if m0 is not None:
        m0 = m0.detach()
    request = capabilities.Request(dtype=q.dtype, grad=_backend.needs_grad(q, k, v, S0, z0), head_dim=shape.dim_qk,
                                   offset=capabilities.max_offset(q, k, v))
    auto_order = AUTO_ORDER.get(q.device.type)
    if feature_map not in CPP_FEATURE_MAPS and auto_order is not None:
        auto_order = tuple(b for b in auto_order if b != "cpp")
    chosen = _backend.select_backend(OP, backend, q.device, request, auto_order=auto_order)
    if chosen == "cpp" and feature_map not in CPP_FEATURE_MAPS:
        raise ValueError(f"dsattn.{OP}: backend='cpp' takes feature_map {tuple(CPP_FEATURE_MAPS)}, got "
                         f"{feature_map!r}; use backend='auto' or 'torch'")
    o, S, z, m = linear_attention_op(q, k, v, S0, z0, m0, feature_map, causal, normalize, float(eps), chosen)
    if output_final_state:
        return o, LinearAttentionState(S, z, m if feature_map == "exp" else None)
    return o
