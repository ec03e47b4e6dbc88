"""Linear attention, chunked over the sequence with a carried state (the "torch" backend).

Causal: per chunk of CHUNK rows, o = phi(Q) S + tril(phi(Q) phi(K)^T) V (the normalizer likewise from z and
the masked scores' row sums), then S += phi(K)^T V, z += colsum phi(K): no [S, S] tensor, one [CHUNK, CHUNK]
block at a time. Keys no query reads through the causal mask (non-causal: all; causal with Sq < Sk: the
first Sk - Sq) are absorbed into the state first, in longer chunks (no score block there).

"exp" is exactly exp(x), kept finite by shifts that cancel: the state is stored as (S, z) scaled by exp(-m),
m [.., Dk] the running max of the keys seen per feature dim (rescaled when it grows), and each query row i is
shifted by c_i = max_d (q_id + M_id), M_i the max over the state and the keys row i sees, so every term
exp(q_id + k_jd - c_i) <= 1 and the largest is 1; eps is shifted with it. Within a causal chunk the keys a
row sees differ per row, so the [n, n] score block is summed per feature dim from the exponents themselves
(a [n, n, Dk] block, EXP_CHUNK rows at a time) rather than as a product of shifted factors, which a later,
larger key in the chunk could underflow. m and c are not differentiated (shifts).

The backward walks the same steps in reverse, carrying dS and dz: the states before each step are
recomputed without grad and kept (O(Sq / CHUNK x Dk x Dv)), then each step is recomputed under autograd on
its own (O(CHUNK x CHUNK) graph). Gradients reach q, k, v, the initial state and come from the output and
the final state. Semantics: SPEC and dsattn.reference.linear_attention.
"""

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map

CHUNK = 64  # rows per causal step (the [CHUNK, CHUNK] masked score block)
EXP_CHUNK = 16  # rows per causal step of the "exp" map (its [n, n, Dk] exponent block)
LONG_CHUNK = 1024  # rows per absorb / apply step: no score block there, only the state products
NO_KEY = -1e30  # m before any key: finite, so shifts stay exact (exp(NO_KEY - x) = 0, NO_KEY - NO_KEY = 0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, hkv):
    """[B, Hq, n, D] -> [B, Hkv, G, n, D], a view: the q heads of one kv head side by side."""
    b, hq = x.shape[:2]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:])


def rescale_state(S, z, m, m_new):
    """(S, z) stored at shift m moved to shift m_new >= m."""
    r = torch.exp(m - m_new)
    return S * r[..., None], z * r


def _absorb(S, z, m, k_c, v_c, feature_map: str):
    """The state (S, z, m) after keys k_c/v_c [B, Hkv, n, D]; S [B, Hkv, G, Dk, Dv], m None except for "exp"."""
    kk = k_c.to(S.dtype)[:, :, None]
    vv = v_c.to(S.dtype)[:, :, None]
    if m is None:
        fk = apply_feature_map(kk, feature_map)
        return S + fk.transpose(-1, -2) @ vv, z + fk.sum(dim=-2), None
    m_new = torch.maximum(m, kk.detach().amax(dim=-2))
    S, z = rescale_state(S, z, m, m_new)
    fk = torch.exp(kk - m_new[..., None, :])
    return S + fk.transpose(-1, -2) @ vv, z + fk.sum(dim=-2), m_new


def _readout(num, den, normalize: bool, eps: float, c=None):
    """num / (den + eps) of the sums that num, den stand for at row shift c (num = exp(-c) x the true one):
    exp(min(c, 0)) multiplies num and den, exp(-max(c, 0)) eps, so no factor exceeds 1."""
    if c is None:
        return num / (den + eps) if normalize else num
    if not normalize:
        return num * torch.exp(c)[..., None]
    low = torch.exp(c.clamp(max=0))[..., None]
    return num * low / (den * low + eps * torch.exp(-c.clamp(min=0))[..., None])


def _causal_step(q_c, k_c, v_c, S, z, m, feature_map: str, normalize: bool, eps: float):
    """Outputs of rows q_c [B, Hq, n, Dk] over the state and the chunk's own keys (k_c/v_c [B, Hkv, n, D],
    key t visible to row t' iff t <= t'), and the state (S, z, m) after the chunk."""
    hkv = k_c.shape[1]
    n = q_c.shape[2]
    qq = _grouped(q_c, hkv).to(S.dtype)  # [B, Hkv, G, n, Dk]
    kk = k_c.to(S.dtype)[:, :, None]  # [B, Hkv, 1, n, Dk]
    vv = v_c.to(S.dtype)[:, :, None]
    visible = torch.ones(n, n, dtype=torch.bool, device=q_c.device).tril()
    zero = torch.zeros((), dtype=S.dtype, device=q_c.device)
    if m is None:
        fq = apply_feature_map(qq, feature_map)
        fk = apply_feature_map(kk, feature_map)
        scores = torch.where(visible, fq @ fk.transpose(-1, -2), zero)
        num = fq @ S + scores @ vv
        den = (fq * z[..., None, :]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
        o = _readout(num, den, normalize, eps)
        S, z = S + fk.transpose(-1, -2) @ vv, z + fk.sum(dim=-2)
    else:
        with torch.no_grad():
            seen = torch.maximum(m[..., None, :], torch.cummax(kk, dim=-2).values)  # [B, Hkv, G, n, Dk]
            c = (qq + seen).amax(dim=-1)  # [B, Hkv, G, n]: the row's largest exponent
            m_new = seen[..., -1, :]
        fq = torch.exp(qq + (m[..., None, :] - c[..., None]))  # <= 1
        exponents = qq[..., :, None, :] + kk[..., None, :, :] - c[..., None, None]  # [B, Hkv, G, n, n, Dk]
        # Masked before exp: an invisible key's exponent may overflow (and its gradient would be NaN).
        scores = torch.exp(torch.where(visible[..., None], exponents, float("-inf"))).sum(-1)
        num = fq @ S + scores @ vv
        den = (fq * z[..., None, :]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True)
        o = _readout(num, den, normalize, eps, c)
        S, z = rescale_state(S, z, m, m_new)
        fk = torch.exp(kk - m_new[..., None, :])
        S, z, m = S + fk.transpose(-1, -2) @ vv, z + fk.sum(dim=-2), m_new
    return o.reshape(q_c.shape[0], -1, n, o.shape[-1]), S, z, m


def _apply_step(q_c, S, z, m, feature_map: str, normalize: bool, eps: float):
    """Outputs of rows q_c over a fixed state (non-causal)."""
    qq = _grouped(q_c, S.shape[1]).to(S.dtype)
    if m is None:
        fq, c = apply_feature_map(qq, feature_map), None
    else:
        c = (qq.detach() + m[..., None, :]).amax(dim=-1)
        fq = torch.exp(qq + (m[..., None, :] - c[..., None]))
    o = _readout(fq @ S, (fq * z[..., None, :]).sum(-1, keepdim=True), normalize, eps, c)
    return o.reshape(q_c.shape[0], -1, q_c.shape[2], o.shape[-1])


def _steps(sq: int, sk: int, causal: bool, feature_map: str):
    """The walk: ("absorb", k0, k1), ("causal", q0, q1, k0) (keys k0 .. k0 + q1 - q0), ("apply", q0, q1)."""
    absorbed = sk - sq if causal else sk
    for k0 in range(0, absorbed, LONG_CHUNK):
        yield ("absorb", k0, min(k0 + LONG_CHUNK, absorbed))
    if causal:
        chunk = EXP_CHUNK if feature_map == "exp" else CHUNK
        for q0 in range(0, sq, chunk):
            yield ("causal", q0, min(q0 + chunk, sq), q0 + absorbed)
    else:
        for q0 in range(0, sq, LONG_CHUNK):
            yield ("apply", q0, min(q0 + LONG_CHUNK, sq))


def _initial(q, k, v, S0, z0, m0, feature_map):
    """(S, z, m) in the grouped layout; m None unless "exp" (NO_KEY without a state, 0 for an unscaled one)."""
    b, hq, _, dk = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    acc = compute_dtype(q.dtype)
    if S0 is None:
        S = torch.zeros(b, hkv, hq // hkv, dk, dv, dtype=acc, device=q.device)
        z = torch.zeros(b, hkv, hq // hkv, dk, dtype=acc, device=q.device)
        m = torch.full_like(z, NO_KEY)
    else:
        S, z = _grouped(S0.to(acc), hkv), _grouped(z0.to(acc), hkv)
        m = torch.zeros_like(z) if m0 is None else _grouped(m0.detach().to(acc), hkv)
    return S, z, (m if feature_map == "exp" else None)


def _ungrouped(S, z, m, b, hq):
    return (S.reshape(b, hq, *S.shape[3:]), z.reshape(b, hq, z.shape[-1]),
            None if m is None else m.reshape(b, hq, m.shape[-1]))


def linear_attention(q, k, v, S0=None, z0=None, m0=None, *, feature_map: str = "elu", causal: bool = True,
                     normalize: bool = True, eps: float = 1e-6):
    """q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv, Sk, Dv] (Hq % Hkv == 0; causal needs Sq <= Sk), an
    optional initial state S0 [B, Hq, Dk, Dv], z0 [B, Hq, Dk] stored at shift m0 [B, Hq, Dk] (None: 0) ->
    (o [B, Hq, Sq, Dv] in q's dtype, S, z, m): the state after every key, float32 (float64 for float64
    inputs), never aliasing S0/z0; m None unless feature_map is "exp" (S, z are then scaled by exp(-m))."""
    b, hq, sq, _ = q.shape
    S, z, m = _initial(q, k, v, S0, z0, m0, feature_map)
    out = torch.empty(b, hq, sq, v.shape[3], dtype=q.dtype, device=q.device)
    for step in _steps(sq, k.shape[2], causal, feature_map):
        if step[0] == "absorb":
            S, z, m = _absorb(S, z, m, k[:, :, step[1]:step[2]], v[:, :, step[1]:step[2]], feature_map)
        elif step[0] == "causal":
            _, q0, q1, k0 = step
            k1 = k0 + q1 - q0
            o, S, z, m = _causal_step(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], S, z, m, feature_map,
                                      normalize, eps)
            out[:, :, q0:q1] = o
        else:
            out[:, :, step[1]:step[2]] = _apply_step(q[:, :, step[1]:step[2]], S, z, m, feature_map, normalize, eps)
    if k.shape[2] == 0:  # no key: the state is the initial one, returned as a tensor of its own
        S, z, m = S.clone(), z.clone(), None if m is None else m.clone()
    return (out, *_ungrouped(S, z, m, b, hq))


def linear_attention_backward(grad_o, grad_S, grad_z, q, k, v, S0=None, z0=None, m0=None, *,
                              feature_map: str = "elu", causal: bool = True, normalize: bool = True,
                              eps: float = 1e-6):
    """(dq, dk, dv, dS0, dz0) of linear_attention for the cotangents of o, S and z (None: zero); dS0/dz0
    None without an initial state. The shifts m0 and m are constants."""
    b, hq, sq, dk = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    steps = list(_steps(sq, sk, causal, feature_map))
    # The state each step reads, recomputed.
    reads = []
    with torch.no_grad():
        S, z, m = _initial(q, k, v, S0, z0, m0, feature_map)
        for step in steps:
            reads.append((S, z, m))
            if step[0] == "absorb":
                S, z, m = _absorb(S, z, m, k[:, :, step[1]:step[2]], v[:, :, step[1]:step[2]], feature_map)
            elif step[0] == "causal":
                k0, k1 = step[3], step[3] + step[2] - step[1]
                S, z, m = _causal_step(q[:, :, step[1]:step[2]], k[:, :, k0:k1], v[:, :, k0:k1], S, z, m,
                                       feature_map, normalize, eps)[1:]
    acc = S.dtype
    dS = torch.zeros_like(S) if grad_S is None else _grouped(grad_S.to(acc), hkv).expand_as(S).clone()
    dz = torch.zeros_like(z) if grad_z is None else _grouped(grad_z.to(acc), hkv).expand_as(z).clone()
    dq, dk_, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if grad_o is None:
        grad_o = torch.zeros(b, hq, sq, v.shape[3], dtype=q.dtype, device=q.device)

    def leaf(t):
        return t.detach().requires_grad_(True)

    # Non-causal: every apply step reads the final state, so their dS / dz add up before the absorbs.
    for step, (S_r, z_r, m_r) in zip(reversed(steps), reversed(reads)):
        kind = step[0]
        with torch.enable_grad():
            if kind == "absorb":
                # The state's values do not enter the gradients (it is scaled, not multiplied): zeros will do.
                k_c, v_c = leaf(k[:, :, step[1]:step[2]]), leaf(v[:, :, step[1]:step[2]])
                S_c, z_c = leaf(torch.zeros_like(S_r)), leaf(torch.zeros_like(z_r))
                S1, z1, _ = _absorb(S_c, z_c, m_r, k_c, v_c, feature_map)
                gk, gv, dS, dz = torch.autograd.grad((S1, z1), (k_c, v_c, S_c, z_c), (dS, dz))
                dk_[:, :, step[1]:step[2]], dv[:, :, step[1]:step[2]] = gk, gv
            elif kind == "causal":
                _, q0, q1, k0 = step
                k1 = k0 + q1 - q0
                q_c, k_c, v_c = leaf(q[:, :, q0:q1]), leaf(k[:, :, k0:k1]), leaf(v[:, :, k0:k1])
                S_c, z_c = leaf(S_r), leaf(z_r)
                o, S1, z1, _ = _causal_step(q_c, k_c, v_c, S_c, z_c, m_r, feature_map, normalize, eps)
                gq, gk, gv, dS, dz = torch.autograd.grad((o, S1, z1), (q_c, k_c, v_c, S_c, z_c),
                                                         (grad_o[:, :, q0:q1], dS, dz))
                dq[:, :, q0:q1], dk_[:, :, k0:k1], dv[:, :, k0:k1] = gq, gk, gv
            else:
                q0, q1 = step[1], step[2]
                q_c, S_c, z_c = leaf(q[:, :, q0:q1]), leaf(S_r), leaf(z_r)
                o = _apply_step(q_c, S_c, z_c, m_r, feature_map, normalize, eps)
                gq, gS, gz = torch.autograd.grad(o, (q_c, S_c, z_c), grad_o[:, :, q0:q1])
                dq[:, :, q0:q1] = gq
                dS, dz = dS + gS, dz + gz
    if S0 is None:
        return dq, dk_, dv, None, None
    return dq, dk_, dv, dS.reshape(S0.shape).to(S0.dtype), dz.reshape(z0.shape).to(z0.dtype)
