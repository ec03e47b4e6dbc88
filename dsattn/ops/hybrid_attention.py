"""dsattn.hybrid_attention: exact softmax on the first `prefix` and the last `window` keys of each query,
linear attention over the other visible keys, one shared normalizer (SPEC; semantics and edge cases in
dsattn.reference.hybrid_attention)."""

import torch

from dsattn import _backend, _checks
from dsattn.reference.hybrid_attention import hybrid_attention as _hybrid_torch
from dsattn.reference.linear_attention import FEATURE_MAPS, feature_map as _feature_map

OP = "hybrid_attention"
IMPLEMENTED = ("torch", "triton")
MAX_HEAD_DIM = 256  # the Triton kernel keeps a [BLOCK_M, Dv] accumulator and [.., Dqk] tiles in registers


def _check_feature_map(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dsattn.{OP}: feature_map must be a str, got {type(name).__name__}")
    if name not in FEATURE_MAPS:
        raise ValueError(f"dsattn.{OP}: feature_map must be one of {tuple(FEATURE_MAPS)}, got {name!r}")
    return name


def hybrid_attention(q, k, v, *, prefix=2048, window=0, feature_map="elu", scale=None, backend="auto"):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (any strides, Hq % Hkv == 0) ->
    [B, Hq, Sq, Dv] in q's dtype. Causal; query i sits at position i + Sk - Sq. prefix >= 0 and window >= 0
    keys are exact (window = 0: no band); prefix >= Sk is causal softmax attention."""
    shape = _checks.check_qkv(OP, q, k, v)
    prefix = _checks.check_int(OP, "prefix", prefix, minimum=0)
    window = _checks.check_int(OP, "window", window, minimum=0)
    feature_map = _check_feature_map(feature_map)
    scale = _checks.check_scale(OP, scale, shape.dim_qk**-0.5)
    chosen = _backend.select_backend(OP, backend, q.device, IMPLEMENTED)
    if chosen == "triton":
        if q.dtype == torch.float64:
            raise TypeError(f"dsattn.{OP}: backend='triton' supports float16, bfloat16 and float32, got float64")
        if max(shape.dim_qk, shape.dim_v) > MAX_HEAD_DIM:
            raise ValueError(
                f"dsattn.{OP}: backend='triton' supports head dims up to {MAX_HEAD_DIM}, "
                f"got q/k {shape.dim_qk} and v {shape.dim_v}"
            )
    # int32 offsets inside the kernels; the clamp keeps "prefix = everything" values like 2**40 harmless
    prefix, window = min(prefix, shape.seq_k + 1), min(window, shape.seq_k + 1)
    if chosen == "torch":
        return _hybrid_torch(q, k, v, prefix=prefix, window=window, feature_map=feature_map, scale=scale)
    from dsattn.triton_kernels.hybrid_attention import hybrid_attention as _hybrid_triton

    phi_q = _feature_map(q, feature_map)
    phi_k = _feature_map(k, feature_map)
    return _hybrid_triton(q, k, v, phi_q, phi_k, prefix=prefix, window=window, scale=scale)
