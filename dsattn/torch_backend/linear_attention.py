"""Linear attention, chunked over the sequence with a carried state (the "torch" backend).

Causal: per chunk of CHUNK rows, o = phi(Q) S + tril(phi(Q) phi(K)^T) V (the normalizer likewise from z and
the masked scores' row sums), then S += phi(K)^T V, z += colsum phi(K): no [S, S] tensor, one [CHUNK, CHUNK]
block at a time. Keys no query reads through the causal mask (non-causal: all; causal with Sq < Sk: the
first Sk - Sq) are absorbed into the state first, in longer chunks (no score block there).

The backward walks the same steps in reverse, carrying dS and dz: the states before each causal step are
recomputed without grad and kept (O(Sq / CHUNK x Dk x Dv)), then each step is recomputed under autograd on
its own (O(CHUNK x CHUNK) graph). Gradients reach q, k, v, the initial state and come from the output and
the final state. Semantics: SPEC and dsattn.reference.linear_attention.
"""

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map

CHUNK = 64  # rows per causal step (the [CHUNK, CHUNK] masked score block)
LONG_CHUNK = 1024  # rows per absorb / apply step: no score block there, only the state products


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, hkv):
    """[B, Hq, n, D] -> [B, Hkv, G, n, D], a view: the q heads of one kv head side by side."""
    b, hq = x.shape[:2]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:])


def _absorb(S, z, k_c, v_c, feature_map: str):
    """(S + phi(k)^T v, z + colsum phi(k)); S [B, Hkv, G, Dk, Dv], k_c/v_c [B, Hkv, n, D]."""
    fk = apply_feature_map(k_c.to(S.dtype), feature_map)[:, :, None]
    return S + fk.transpose(-1, -2) @ v_c.to(S.dtype)[:, :, None], z + fk.sum(dim=-2)


def _readout(num, den, normalize: bool, eps: float):
    return num / (den + eps) if normalize else num


def _causal_step(q_c, k_c, v_c, S, z, feature_map: str, normalize: bool, eps: float):
    """Outputs of rows q_c [B, Hq, n, Dk] over the state and the chunk's own keys (k_c/v_c [B, Hkv, n, D],
    key t visible to row t' iff t <= t'), and the state after the chunk."""
    hkv = k_c.shape[1]
    fq = apply_feature_map(_grouped(q_c, hkv).to(S.dtype), feature_map)  # [B, Hkv, G, n, Dk]
    fk = apply_feature_map(k_c.to(S.dtype), feature_map)[:, :, None]  # [B, Hkv, 1, n, Dk]
    vv = v_c.to(S.dtype)[:, :, None]
    n = q_c.shape[2]
    visible = torch.ones(n, n, dtype=torch.bool, device=q_c.device).tril()
    scores = torch.where(visible, fq @ fk.transpose(-1, -2), torch.zeros((), dtype=S.dtype, device=q_c.device))
    num = fq @ S + scores @ vv
    den = (fq * z[..., None, :]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
    o = _readout(num, den, normalize, eps)
    return o.reshape(q_c.shape[0], -1, n, o.shape[-1]), S + fk.transpose(-1, -2) @ vv, z + fk.sum(dim=-2)


def _apply_step(q_c, S, z, feature_map: str, normalize: bool, eps: float):
    """Outputs of rows q_c over a fixed state (non-causal)."""
    fq = apply_feature_map(_grouped(q_c, S.shape[1]).to(S.dtype), feature_map)
    o = _readout(fq @ S, (fq * z[..., None, :]).sum(-1, keepdim=True), normalize, eps)
    return o.reshape(q_c.shape[0], -1, q_c.shape[2], o.shape[-1])


def _steps(sq: int, sk: int, causal: bool):
    """The walk: ("absorb", k0, k1), ("causal", q0, q1, k0) (keys k0 .. k0 + q1 - q0), ("apply", q0, q1)."""
    absorbed = sk - sq if causal else sk
    for k0 in range(0, absorbed, LONG_CHUNK):
        yield ("absorb", k0, min(k0 + LONG_CHUNK, absorbed))
    if causal:
        for q0 in range(0, sq, CHUNK):
            yield ("causal", q0, min(q0 + CHUNK, sq), q0 + absorbed)
    else:
        for q0 in range(0, sq, LONG_CHUNK):
            yield ("apply", q0, min(q0 + LONG_CHUNK, sq))


def _initial(q, k, v, S0, z0):
    b, hq, _, dk = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    acc = compute_dtype(q.dtype)
    if S0 is None:
        return (torch.zeros(b, hkv, hq // hkv, dk, dv, dtype=acc, device=q.device),
                torch.zeros(b, hkv, hq // hkv, dk, dtype=acc, device=q.device))
    return _grouped(S0.to(acc), hkv), _grouped(z0.to(acc), hkv)


def linear_attention(q, k, v, S0=None, z0=None, *, feature_map: str = "elu", causal: bool = True,
                     normalize: bool = True, eps: float = 1e-6):
    """q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv] (Hq % Hkv == 0; causal needs Sq <= Sk), an
    optional initial state S0 [B, Hq, Dk, Dv], z0 [B, Hq, Dk] -> (o [B, Hq, Sq, Dv] in q's dtype, S, z): the
    state after every key, float32 (float64 for float64 inputs), never aliasing S0/z0."""
    b, hq, sq, _ = q.shape
    S, z = _initial(q, k, v, S0, z0)
    out = torch.empty(b, hq, sq, v.shape[3], dtype=q.dtype, device=q.device)
    for step in _steps(sq, k.shape[2], causal):
        if step[0] == "absorb":
            S, z = _absorb(S, z, k[:, :, step[1]:step[2]], v[:, :, step[1]:step[2]], feature_map)
        elif step[0] == "causal":
            _, q0, q1, k0 = step
            k1 = k0 + q1 - q0
            o, S, z = _causal_step(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], S, z, feature_map, normalize, eps)
            out[:, :, q0:q1] = o
        else:
            out[:, :, step[1]:step[2]] = _apply_step(q[:, :, step[1]:step[2]], S, z, feature_map, normalize, eps)
    if k.shape[2] == 0:  # no key: the state is the initial one, returned as a tensor of its own
        S, z = S.clone(), z.clone()
    return out, S.reshape(b, hq, *S.shape[3:]), z.reshape(b, hq, z.shape[-1])


def linear_attention_backward(grad_o, grad_S, grad_z, q, k, v, S0=None, z0=None, *, feature_map: str = "elu",
                              causal: bool = True, normalize: bool = True, eps: float = 1e-6):
    """(dq, dk, dv, dS0, dz0) of linear_attention for the cotangents of o, S and z (None: zero); dS0/dz0
    None without an initial state."""
    b, hq, sq, dk = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    steps = list(_steps(sq, sk, causal))
    # The state each step reads, recomputed (absorb steps' gradients do not depend on it).
    reads = []
    with torch.no_grad():
        S, z = _initial(q, k, v, S0, z0)
        for step in steps:
            if step[0] == "absorb":
                S, z = _absorb(S, z, k[:, :, step[1]:step[2]], v[:, :, step[1]:step[2]], feature_map)
                reads.append(None)
            else:
                reads.append((S, z))
                if step[0] == "causal":
                    k0, k1 = step[3], step[3] + step[2] - step[1]
                    S, z = _causal_step(q[:, :, step[1]:step[2]], k[:, :, k0:k1], v[:, :, k0:k1], S, z, feature_map,
                                        normalize, eps)[1:]
    acc = S.dtype
    dS = torch.zeros_like(S) if grad_S is None else _grouped(grad_S.to(acc), hkv).expand_as(S).clone()
    dz = torch.zeros_like(z) if grad_z is None else _grouped(grad_z.to(acc), hkv).expand_as(z).clone()
    dq, dk_, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if grad_o is None:
        grad_o = torch.zeros(b, hq, sq, v.shape[3], dtype=q.dtype, device=q.device)

    def leaf(t):
        return t.detach().requires_grad_(True)

    # Non-causal: every apply step reads the final state, so their dS / dz add up before the absorbs.
    for step, read in zip(reversed(steps), reversed(reads)):
        kind = step[0]
        with torch.enable_grad():
            if kind == "absorb":
                k_c, v_c = leaf(k[:, :, step[1]:step[2]]), leaf(v[:, :, step[1]:step[2]])
                S1, z1 = _absorb(torch.zeros_like(S), torch.zeros_like(z), k_c, v_c, feature_map)
                dk_[:, :, step[1]:step[2]], dv[:, :, step[1]:step[2]] = torch.autograd.grad((S1, z1), (k_c, v_c),
                                                                                            (dS, dz))
            elif kind == "causal":
                _, q0, q1, k0 = step
                k1 = k0 + q1 - q0
                q_c, k_c, v_c = leaf(q[:, :, q0:q1]), leaf(k[:, :, k0:k1]), leaf(v[:, :, k0:k1])
                S_c, z_c = leaf(read[0]), leaf(read[1])
                o, S1, z1 = _causal_step(q_c, k_c, v_c, S_c, z_c, feature_map, normalize, eps)
                gq, gk, gv, dS, dz = torch.autograd.grad((o, S1, z1), (q_c, k_c, v_c, S_c, z_c),
                                                         (grad_o[:, :, q0:q1], dS, dz))
                dq[:, :, q0:q1], dk_[:, :, k0:k1], dv[:, :, k0:k1] = gq, gk, gv
            else:
                q0, q1 = step[1], step[2]
                q_c, S_c, z_c = leaf(q[:, :, q0:q1]), leaf(read[0]), leaf(read[1])
                o = _apply_step(q_c, S_c, z_c, feature_map, normalize, eps)
                gq, gS, gz = torch.autograd.grad(o, (q_c, S_c, z_c), grad_o[:, :, q0:q1])
                dq[:, :, q0:q1] = gq
                dS, dz = dS + gS, dz + gz
    if S0 is None:
        return dq, dk_, dv, None, None
    return dq, dk_, dv, dS.reshape(S0.shape).to(S0.dtype), dz.reshape(z0.shape).to(z0.dtype)
