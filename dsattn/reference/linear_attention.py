"""Linear (kernelized) attention, the oracle: dense phi(Q) phi(K)^T scores and an explicit causal mask,
written for clarity (O(Sq x Sk) memory: tests only). The tuned chunked code is the "torch" backend
(dsattn.torch_backend.linear_attention).

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = S0 + sum_{j<=p} phi(k_j)^T v_j,   z_i = z0 + sum_{j<=p} phi(k_j)

with query i at position p = i + Sk - Sq (causal; non-causal sums over every j) and (S0, z0) the initial
state (zero by default). No scale is applied (SPEC gives none). Without `normalize` the division is dropped.
The state (S [B, Hq, Dk, Dv], z [B, Hq, Dk], fp32; fp64 for fp64 inputs) carries a sequence from one call to
the next: feeding two halves in sequence with the state equals feeding the whole. Keys a row cannot see
never enter its arithmetic (a NaN there stays out).

The state may be stored scaled (LinearAttentionState.m, a per (head, feature dim) shift): the sums it stands
for are S * exp(m)[..., None] and z * exp(m). The backends keep the "exp" map's state that way, with m the
running max of the keys seen in each feature dim, so that S and z stay finite whatever the keys' size. The
oracle returns its state unscaled (m None) and takes either form.

Feature maps (FEATURE_MAPS, applied to each row of q and k over the head dim; the one definition every
backend uses):
  "elu"      elu(x) + 1                      (Katharopoulos et al.; positive)
  "relu"     relu(x)
  "exp"      exp(x)                          exactly, elementwise (the seeds' exp map). The oracle computes
             it as written (tests keep inputs where float64 cannot overflow); the backends keep it from
             overflowing only by shifts that cancel (a running max carried with the state).
  "identity" x
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "exp", "identity")


class LinearAttentionState(NamedTuple):
    """The running state after some keys: sum phi(k_j)^T v_j = S * exp(m)[..., None] [B, Hq, Dk, Dv] and
    sum phi(k_j) = z * exp(m) [B, Hq, Dk], all float32 (float64 when the inputs are float64). m [B, Hq, Dk]
    is a shift that is not differentiated (None: 0, the sums themselves; the "exp" map's states carry the
    running max of the keys per feature dim there). Gradients flow through S and z."""

    S: torch.Tensor
    z: torch.Tensor
    m: torch.Tensor | None = None

    def unscaled(self) -> "LinearAttentionState":
        """The sums themselves (m None): they overflow where exp(m) does."""
        if self.m is None:
            return self
        scale = torch.exp(self.m.detach())
        return LinearAttentionState(self.S * scale[..., None], self.z * scale)


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) over the last dim (the head dim), in x's dtype; `name` one of FEATURE_MAPS."""
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "exp":
        return torch.exp(x)
    if name == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


_phi = feature_map  # linear_attention's `feature_map` argument shadows the function's name


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
):
    """q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv], Hq % Hkv == 0. Returns o [B, Hq, Sq, Dv] in
    q's dtype, and the final state (over all Sk keys, unscaled) when output_final_state. Computed in float32
    (float64 for float64 inputs)."""
    b, hq, sq, dk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = _phi(q.to(acc), feature_map)
    fk = _phi(k.to(acc), feature_map).repeat_interleave(hq // hkv, dim=1)
    vv = v.to(acc).repeat_interleave(hq // hkv, dim=1)
    if initial_state is None:
        S0 = torch.zeros(b, hq, dk, dv, dtype=acc, device=q.device)
        z0 = torch.zeros(b, hq, dk, dtype=acc, device=q.device)
    else:
        state = LinearAttentionState(*(None if t is None else t.to(acc) for t in initial_state))
        S0, z0 = state.unscaled()[:2]

    position = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=q.device)[None, :]
    visible = key <= position if causal else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    scores = torch.where(visible, fq @ fk.transpose(-1, -2), torch.zeros((), dtype=acc))  # [B, Hq, Sq, Sk]
    # Sum only the visible keys' values: 0 * NaN would leak an invisible NaN.
    terms = torch.where(visible[..., None], scores[..., None] * vv[:, :, None], torch.zeros((), dtype=acc))
    num = fq @ S0 + terms.sum(dim=-2)
    den = (fq * z0[:, :, None]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
    o = (num / (den + eps) if normalize else num).to(q.dtype)
    if output_final_state:
        S = S0 + fk.transpose(-1, -2) @ vv
        z = z0 + fk.sum(dim=-2)
        return o, LinearAttentionState(S, z)
    return o
