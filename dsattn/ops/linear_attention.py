"""linear_attention: kernelized attention with a running state (SPEC).

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = sum_{j<=i} phi(k_j)^T v_j,   z_i = sum_{j<=i} phi(k_j)

No scale is applied (SPEC gives none; scale q yourself if you want one — with "elu"/"exp" that changes phi,
not just the output). Without `normalize` the division is dropped; non-causal sums over every key. Feature
maps and the stable "exp" are described in dsattn.reference.linear_attention. Causal with Sq < Sk: query i
sits at position i + Sk - Sq (the keys before the first query only feed the state); Sq > Sk is an error.

The state `LinearAttentionState(S [B, Hq, Dk, Dv], z [B, Hq, Dk])`, float32 (float64 for float64 inputs),
covers every key seen: pass a call's final state as the next call's `initial_state` and two halves equal
the whole. dsattn.cache.LinearAttentionCache keeps it per layer for generate().
"""

import torch

from dsattn import _backend, _checks
from dsattn.reference.linear_attention import FEATURE_MAPS, LinearAttentionState
from dsattn.reference.linear_attention import linear_attention as _linear_attention_torch

OP = "linear_attention"
IMPLEMENTED = ("triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_DK = 256  # the Triton kernels hold the whole q/k head dim in one tile


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"dsattn.{OP}: {name} must be a bool, got {type(value).__name__}")


def _check_state(initial_state, shape: _checks.AttentionShape, q: torch.Tensor) -> LinearAttentionState | None:
    if initial_state is None:
        return None
    if not isinstance(initial_state, tuple) or len(initial_state) != 2:
        raise TypeError(
            f"dsattn.{OP}: initial_state must be a LinearAttentionState(S, z) (or a (S, z) tuple), "
            f"got {type(initial_state).__name__}"
        )
    S, z = initial_state
    dtypes = (torch.float32, torch.float64)
    _checks.check_tensor(OP, "initial_state.S", S, ndim=4, dtypes=dtypes)
    _checks.check_tensor(OP, "initial_state.z", z, ndim=3, dtypes=dtypes)
    _checks.check_same_device(OP, q=q, **{"initial_state.S": S, "initial_state.z": z})
    expected_S = (shape.batch, shape.heads_q, shape.dim_qk, shape.dim_v)
    expected_z = (shape.batch, shape.heads_q, shape.dim_qk)
    if tuple(S.shape) != expected_S:
        raise ValueError(f"dsattn.{OP}: initial_state.S must be [B, Hq, Dk, Dv] = {expected_S}, got {tuple(S.shape)}")
    if tuple(z.shape) != expected_z:
        raise ValueError(f"dsattn.{OP}: initial_state.z must be [B, Hq, Dk] = {expected_z}, got {tuple(z.shape)}")
    return LinearAttentionState(S, z)


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
    output_final_state. O(S x Dk x Dv) time, O(Dk x Dv) state; no [S, S] tensor."""
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

    triton_ok = q.dtype in TRITON_DTYPES and shape.dim_qk <= TRITON_MAX_DK
    if backend == "triton" and not triton_ok:
        raise ValueError(
            f"dsattn.{OP}: backend='triton' supports float16/bfloat16/float32 and Dk <= {TRITON_MAX_DK}; "
            f"got q {q.dtype} with Dk={shape.dim_qk}"
        )
    chosen = _backend.select_backend(OP, backend, q.device, IMPLEMENTED if triton_ok else ("torch",))
    if chosen == "torch":
        return _linear_attention_torch(
            q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, eps=float(eps),
            initial_state=state, output_final_state=output_final_state,
        )
    from dsattn.triton_kernels.linear_attention import linear_attention as _linear_attention_triton

    if state is not None:
        state = LinearAttentionState(state.S.float(), state.z.float())
    o, final = _linear_attention_triton(
        q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, eps=float(eps),
        initial_state=state, output_final_state=output_final_state,
    )
    if output_final_state:
        return o, LinearAttentionState(*final)
    return o
