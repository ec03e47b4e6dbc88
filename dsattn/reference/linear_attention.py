"""Linear (kernelized) attention, plain PyTorch: the oracle for the Triton kernels and the "torch" backend.

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = sum_{j<=i} phi(k_j)^T v_j,   z_i = sum_{j<=i} phi(k_j)

No scale is applied (SPEC gives none). Without `normalize` the division is dropped; non-causal sums over
every j. The state (S [B, Hq, Dk, Dv], z [B, Hq, Dk], fp32) carries a sequence from one call to the next:
feeding two halves in sequence with the state equals feeding the whole.

Computed in chunks of CHUNK positions (no [S, S] tensor): inside a chunk a masked attention-like matmul
phi(Q) phi(K)^T, across chunks the running state. Math in fp32 (float64 for float64 inputs).

Feature maps (FEATURE_MAPS, applied to each row of q and k over the head dim):
  "elu"      elu(x) + 1                      (Katharopoulos et al.; positive)
  "relu"     relu(x)
  "exp"      exp(x - max_d x)                 the row's max over the head dim is subtracted, so every value
             is in (0, 1] and never overflows. The shift depends only on that row, so phi of a token is the
             same whichever call sees it: the state stays composable across calls (a shift by a max over the
             sequence would not be). For q the shift is a per-row factor that cancels in the normalized
             output (up to eps); for k it is a per-key weight exp(-max_d k_j) — this is the map's definition,
             as in fla's Hedgehog map (a softmax over the feature dim), not exp(x) up to a constant.
  "identity" x
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "exp", "identity")
CHUNK = 64


class LinearAttentionState(NamedTuple):
    """The running state after some keys: S = sum phi(k_j)^T v_j [B, Hq, Dk, Dv] and z = sum phi(k_j)
    [B, Hq, Dk], both float32 (float64 when the inputs are float64)."""

    S: torch.Tensor
    z: torch.Tensor


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) over the last dim (the head dim), in x's dtype; `name` one of FEATURE_MAPS."""
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "exp":
        return torch.exp(x - x.amax(dim=-1, keepdim=True))
    if name == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


_phi = feature_map  # linear_attention's `feature_map` argument shadows the function's name


def _accumulate(state: LinearAttentionState, fk: torch.Tensor, v: torch.Tensor) -> LinearAttentionState:
    """Add keys fk [..., n, Dk] (already mapped) with values v [..., n, Dv] to the state, chunk by chunk."""
    S, z = state
    for start in range(0, fk.shape[-2], CHUNK):
        fk_c, v_c = fk[..., start : start + CHUNK, :], v[..., start : start + CHUNK, :]
        S = S + fk_c.transpose(-1, -2) @ v_c
        z = z + fk_c.sum(dim=-2)
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
    initial_state: LinearAttentionState | None = None,
    output_final_state: bool = False,
):
    """q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv]. Returns o [B, Hq, Sq, Dv] in q's dtype, and
    the final state (over all Sk keys) when output_final_state. Causal with Sq < Sk: query i sits at position
    i + Sk - Sq (the first Sk - Sq keys go into the state before the queries start). Inputs are validated by
    dsattn.ops.linear_attention."""
    b, hq, sq, dk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA without copies: q heads as [B, Hkv, G, ...], k/v as [B, Hkv, 1, ...] broadcast over the group.
    fq = _phi(q.to(acc), feature_map).reshape(b, hkv, groups, sq, dk)
    fk = _phi(k.to(acc), feature_map)[:, :, None]
    vv = v.to(acc)[:, :, None]
    if initial_state is None:
        S = torch.zeros(b, hkv, groups, dk, dv, dtype=acc, device=q.device)
        z = torch.zeros(b, hkv, groups, dk, dtype=acc, device=q.device)
    else:
        S = initial_state.S.to(acc).reshape(b, hkv, groups, dk, dv)
        z = initial_state.z.to(acc).reshape(b, hkv, groups, dk)
    state = LinearAttentionState(S, z)

    out = torch.empty(b, hkv, groups, sq, dv, dtype=acc, device=q.device)
    if not causal:
        state = _accumulate(state, fk, vv)
        for start in range(0, sq, CHUNK):
            fq_c = fq[..., start : start + CHUNK, :]
            num = fq_c @ state.S
            den = (fq_c * state.z[..., None, :]).sum(-1, keepdim=True)
            out[..., start : start + CHUNK, :] = num / (den + eps) if normalize else num
    else:
        # Keys before the first query (decode / chunked prefill) only feed the state.
        offset = sk - sq
        state = _accumulate(state, fk[..., :offset, :], vv[..., :offset, :])
        fk, vv = fk[..., offset:, :], vv[..., offset:, :]
        for start in range(0, sq, CHUNK):
            stop = min(start + CHUNK, sq)
            fq_c, fk_c, v_c = fq[..., start:stop, :], fk[..., start:stop, :], vv[..., start:stop, :]
            mask = torch.ones(stop - start, stop - start, dtype=torch.bool, device=q.device).tril()
            scores = (fq_c @ fk_c.transpose(-1, -2)).masked_fill(~mask, 0.0)  # [.., C, C] within the chunk
            num = fq_c @ state.S + scores @ v_c
            den = (fq_c * state.z[..., None, :]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
            out[..., start:stop, :] = num / (den + eps) if normalize else num
            state = _accumulate(state, fk_c, v_c)
    o = out.reshape(b, hq, sq, dv).to(q.dtype)
    if output_final_state:
        return o, LinearAttentionState(state.S.reshape(b, hq, dk, dv), state.z.reshape(b, hq, dk))
    return o
