"""Hybrid attention, chunked over queries (the "torch" backend). Semantics: SPEC and
dsattn.reference.hybrid_attention.

Per chunk of rows, the exact part scores only the prefix keys and the chunk's window band; the far part is
causal linear attention with a lag of `window` keys: a running state (sum phi(k)^T v, sum phi(k)) over the
far keys below the chunk's first row's bound, plus the few far keys between that bound and each row's own
as a small masked phi(q) phi(k)^T product. Memory O(chunk x (prefix + chunk + window)), never [Sq, Sk].

The chunks share only the state, so the backward recomputes one chunk at a time under autograd (the states
each chunk read are recomputed and kept: O(Sq / chunk x Dqk x Dv)) and walks them in reverse, carrying the
state's cotangent back to the keys that entered it.

"exp" is exactly exp(x), so phi(q).phi(k) = sum_d e^(q_d + k_d) overflows for large inputs unless shifted. Only
shifts that cancel are used: the state holds sum_j e^(k_jd - R_d) v_j with R_d the running max of dim d over
its keys (rescaled when R grows), the tail keys are shifted by their own per-dim max, and each row's numerator
and denominator are both multiplied by e^(-c_i), c_i the largest exponent the row forms over the keys it sees
(0 for the exact part, whose terms e^(s - m) are <= 1): every term is <= 1 and the largest about 1 (see
_exp_shifted for the one factor that can exceed 1). The shifts are constants (detached): the gradient is
that of the unshifted formula.
"""

import dataclasses

import torch

from dsattn.reference.linear_attention import feature_map as apply_feature_map

QUERY_CHUNK = 128


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows [i0, i1); exact keys [0, n_prefix) and [band_lo, band_hi); the state covers far keys
    [prefix, state_hi) after absorbing [absorb_lo, state_hi); tail far keys [state_hi, tail_hi)."""

    i0: int
    i1: int
    n_prefix: int
    band_lo: int
    band_hi: int
    absorb_lo: int
    state_hi: int
    tail_hi: int


def plan(sq: int, sk: int, prefix: int, window: int, chunk: int = QUERY_CHUNK):
    """The query chunks and the key ranges each reads (the Triton kernel uses the same bounds)."""
    state_hi = min(prefix, sk)
    for i0 in range(0, sq, chunk):
        i1 = min(i0 + chunk, sq)
        p_first, p_last = i0 + sk - sq, i1 - 1 + sk - sq
        n_prefix = max(0, min(prefix, sk, p_last + 1))
        band_lo = min(max(prefix, p_first - window + 1, 0), sk)
        band_hi = max(band_lo, min(p_last + 1, sk)) if window > 0 else band_lo
        absorb_lo = state_hi
        state_hi = max(state_hi, min(p_first - window + 1, sk))  # far keys every row of the chunk sees
        tail_hi = max(state_hi, min(p_last - window + 1, sk))
        yield Chunk(i0, i1, n_prefix, band_lo, band_hi, absorb_lo, state_hi, tail_hi)


def absorb(k_r, v_r, feature_map: str, dtype: torch.dtype, shift=None):
    """(phi(k)^T v [B, Hkv, Dqk, Dv], sum phi(k) [B, Hkv, Dqk]) of keys k_r/v_r [B, Hkv, n, D]; for "exp",
    phi(k) = e^(k - shift) with shift [B, Hkv, Dqk] (a constant)."""
    if feature_map == "exp":
        fk = torch.exp(k_r.to(dtype) - _finite(shift)[:, :, None])
    else:
        fk = apply_feature_map(k_r.to(dtype), feature_map)
    return fk.transpose(-1, -2) @ v_r.to(dtype), fk.sum(dim=2)


def _finite(x):
    """x with -inf (an empty max) as 0: a shift to subtract, never a NaN from -inf - -inf."""
    return torch.where(x == float("-inf"), torch.zeros((), dtype=x.dtype, device=x.device), x)


def _rescale(old, new):
    """e^(old - new) for shifts old <= new; 0 where old is -inf (nothing was there)."""
    return torch.where(old == float("-inf"), torch.zeros((), dtype=old.dtype, device=old.device),
                       torch.exp(old - _finite(new)))


@dataclasses.dataclass(frozen=True)
class State:
    """Far-key sums: kv = sum phi(k)^T v [B, Hkv, Dqk, Dv], k = sum phi(k) [B, Hkv, Dqk]; for "exp" phi(k) is
    e^(k - shift), shift [B, Hkv, Dqk] the running per-dim max over the keys in the state (-inf: none)."""

    kv: torch.Tensor
    k: torch.Tensor
    shift: torch.Tensor | None

    @staticmethod
    def empty(b, hkv, dqk, dv, dtype, device, feature_map):
        shift = torch.full((b, hkv, dqk), float("-inf"), dtype=dtype, device=device) if feature_map == "exp" else None
        return State(torch.zeros(b, hkv, dqk, dv, dtype=dtype, device=device),
                     torch.zeros(b, hkv, dqk, dtype=dtype, device=device), shift)

    def add(self, k_r, v_r, feature_map: str) -> "State":
        """The state after also absorbing keys k_r / v_r [B, Hkv, n, D] (no autograd through the shift)."""
        dtype = self.kv.dtype
        if feature_map != "exp":
            d_kv, d_k = absorb(k_r, v_r, feature_map, dtype)
            return State(self.kv + d_kv, self.k + d_k, None)
        shift = torch.maximum(self.shift, k_r.detach().to(dtype).amax(dim=2))
        d_kv, d_k = absorb(k_r, v_r, feature_map, dtype, shift)
        r = _rescale(self.shift, shift)
        return State(self.kv * r[..., None] + d_kv, self.k * r + d_k, shift)


def attend_chunk(q_c, k_exact, v_exact, exact_keys, k_tail, v_tail, tail_lo: int, state_kv, state_k, state_shift,
                 c: Chunk, sq: int, sk: int, prefix: int, window: int, feature_map: str, scale: float):
    """Output rows c.i0 .. c.i1 (q_c [B, Hq, C, Dqk]) in the compute dtype of the state. k_exact/v_exact
    [B, Hkv, n, D] are the keys at positions exact_keys [n]; k_tail/v_tail the far keys from tail_lo on; the
    state (state_kv, state_k, state_shift) as in State."""
    b, hq, rows, dqk = q_c.shape
    hkv, dtype = state_kv.shape[1], state_kv.dtype
    groups = hq // hkv
    zero = torch.zeros((), dtype=dtype, device=q_c.device)
    qf = q_c.to(dtype).reshape(b, hkv, groups * rows, dqk)  # GQA without repeating K/V
    pos = (torch.arange(c.i0, c.i1, device=q_c.device) + (sk - sq))[:, None]

    # Exact keys: softmax weights e^(s - m) with m the max exact score of the row (not detached: the far
    # terms are not scaled by e^-m, so m is part of the output).
    j = exact_keys[None, :]
    exact = (j <= pos) & ((j < prefix) | (j > pos - window))
    scores = (qf @ k_exact.to(dtype).transpose(-1, -2) * scale).view(b, hkv, groups, rows, -1)
    scores = scores.masked_fill(~exact, float("-inf"))
    if exact_keys.numel():
        m = scores.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, zero)  # no exact key: m is unused
    else:
        m = torch.zeros(b, hkv, groups, rows, 1, dtype=dtype, device=q_c.device)
    weights = torch.exp(scores - m).view(b, hkv, groups * rows, -1)
    num = weights @ v_exact.to(dtype)
    den = weights.sum(dim=-1, keepdim=True)

    # Far keys: the state, then the tail keys up to each row's own bound.
    if feature_map == "exp":
        n_tail = (pos[:, 0] - window + 1 - tail_lo).clamp(0, k_tail.shape[2])
        fq, fq_tail, fk_tail, num, den = _exp_shifted(qf, k_tail, n_tail, state_shift, num, den)
    else:
        fq = fq_tail = apply_feature_map(qf, feature_map)
        fk_tail = apply_feature_map(k_tail.to(dtype), feature_map)
    num = num + fq @ state_kv
    den = den + fq @ state_k[..., None]
    if k_tail.shape[2]:
        jt = torch.arange(tail_lo, tail_lo + k_tail.shape[2], device=q_c.device)[None, :]
        a = (fq_tail @ fk_tail.transpose(-1, -2)).view(b, hkv, groups, rows, -1)
        a = torch.where(jt <= pos - window, a, zero).view(b, hkv, groups * rows, -1)  # tail keys >= prefix
        num = num + a @ v_tail.to(dtype)
        den = den + a.sum(dim=-1, keepdim=True)
    safe = torch.where(den == 0, torch.ones_like(den), den)
    out = torch.where(den == 0, zero, num / safe)  # no visible key (or far terms summing to 0): zeros
    return out.view(b, hq, rows, -1)


def _exp_shifted(qf, k_tail, n_tail, state_shift, num, den):
    """The "exp" map with shifts that cancel: (e^(q + R - c) for the state, e^(q + beta - c) and e^(k - beta)
    for the tail, and the exact num / den times e^-c). R is the state's per-dim shift, beta the tail keys'
    per-dim max (their finite values: a NaN / inf key stays out of the other rows' shifts, the mask removes its
    terms). c_i is the row's largest exponent over the keys it sees (0 at least when it has exact keys, whose
    terms are <= 1): n_tail [rows] tail keys for row i, whose per-dim max is a running max over the tail. A
    row's factor e^(q + beta - c) exceeds 1 only by keys it does not see; it is capped at e^80 (its terms
    then underflow only where a key it does not see exceeds every key it sees by ~80 in that dim)."""
    b, hkv, n, dqk = qf.shape
    rows = n_tail.shape[0]
    zero = torch.zeros((), dtype=qf.dtype, device=qf.device)
    neg_inf = torch.tensor(float("-inf"), dtype=qf.dtype, device=qf.device)
    with torch.no_grad():
        q0 = qf.detach()
        c = torch.where(den > 0, zero, neg_inf)  # [B, Hkv, G * rows, 1]
        c = torch.maximum(c, (q0 + state_shift[:, :, None, :]).amax(dim=-1, keepdim=True))
        if k_tail.shape[2]:
            kt = k_tail.detach().to(qf.dtype)
            running = torch.where(torch.isfinite(kt), kt, neg_inf).cummax(dim=2).values  # [B, Hkv, T, Dqk]
            beta = running[:, :, -1]
            seen = running[:, :, (n_tail - 1).clamp(min=0)]  # [B, Hkv, rows, Dqk]: max over the keys row i sees
            seen = torch.where((n_tail > 0)[:, None], seen, neg_inf)
            g = (q0.view(b, hkv, -1, rows, dqk) + seen[:, :, None]).amax(dim=-1, keepdim=True).view(b, hkv, n, 1)
            c = torch.maximum(c, g)
        else:
            beta = torch.full_like(state_shift, float("-inf"))
        c = _finite(c)
        exact_scale = torch.where(den > 0, torch.exp(-c), zero)

    def phi_q(shift):  # e^(q + shift - c), 0 in dims without keys
        s = shift[:, :, None, :]
        return torch.where(s == float("-inf"), zero, torch.exp((qf + _finite(s) - c).clamp(max=80.0)))

    fk_tail = torch.exp(k_tail.to(qf.dtype) - _finite(beta)[:, :, None, :])
    return phi_q(state_shift), phi_q(beta), fk_tail, num * exact_scale, den * exact_scale


def _exact_keys(c: Chunk, device):
    return torch.cat([torch.arange(c.n_prefix, device=device), torch.arange(c.band_lo, c.band_hi, device=device)])


def _gather(t, c: Chunk):
    """t's exact keys of chunk c: the prefix and the band, two slices (one copy only when both are there)."""
    if c.band_hi == c.band_lo:
        return t[:, :, : c.n_prefix]
    if c.n_prefix == 0:
        return t[:, :, c.band_lo : c.band_hi]
    return torch.cat([t[:, :, : c.n_prefix], t[:, :, c.band_lo : c.band_hi]], dim=2)


def hybrid_attention(q, k, v, *, prefix: int, window: int, feature_map: str, scale: float, chunk: int = QUERY_CHUNK):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] in q's dtype."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    out = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    state = State.empty(b, hkv, dqk, dv, dtype, q.device, feature_map)
    for c in plan(sq, sk, prefix, window, chunk):
        if c.state_hi > c.absorb_lo:
            state = state.add(k[:, :, c.absorb_lo : c.state_hi], v[:, :, c.absorb_lo : c.state_hi], feature_map)
        o = attend_chunk(q[:, :, c.i0 : c.i1], _gather(k, c), _gather(v, c), _exact_keys(c, q.device),
                         k[:, :, c.state_hi : c.tail_hi], v[:, :, c.state_hi : c.tail_hi], c.state_hi, state.kv,
                         state.k, state.shift, c, sq, sk, prefix, window, feature_map, scale)
        out[:, :, c.i0 : c.i1] = o.to(q.dtype)
    return out


def hybrid_attention_backward(grad_out, q, k, v, *, prefix: int, window: int, feature_map: str, scale: float,
                              chunk: int = QUERY_CHUNK):
    """(dq, dk, dv) of hybrid_attention for grad_out [B, Hq, Sq, Dv], in the inputs' dtypes."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    chunks = list(plan(sq, sk, prefix, window, chunk))
    states = []
    with torch.no_grad():
        state = State.empty(b, hkv, dqk, dv, dtype, q.device, feature_map)
        for c in chunks:
            if c.state_hi > c.absorb_lo:
                state = state.add(k[:, :, c.absorb_lo : c.state_hi], v[:, :, c.absorb_lo : c.state_hi], feature_map)
            states.append(state)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=k.device)
    dv_ = torch.zeros(v.shape, dtype=dtype, device=v.device)
    # Cotangent of the state summed over this and every later chunk: what the keys absorbed here receive. For
    # "exp" it is kept in this chunk's shift: a later state holds a key's term as e^(k - R_later), so its
    # cotangent enters as g_later * e^(R_here - R_later) (<= 1: the shift only grows).
    g_kv = torch.zeros(b, hkv, dqk, dv, dtype=dtype, device=q.device)
    g_k = torch.zeros(b, hkv, dqk, dtype=dtype, device=q.device)
    later_shift = None

    def leaf(t):
        return t.detach().to(dtype).requires_grad_(True)

    for c, s in zip(reversed(chunks), reversed(states)):
        if later_shift is not None:
            r = _rescale(s.shift, later_shift)
            g_kv, g_k = g_kv * r[..., None], g_k * r
        later_shift = s.shift
        with torch.enable_grad():
            q_c = leaf(q[:, :, c.i0 : c.i1])
            k_pre, v_pre = leaf(k[:, :, : c.n_prefix]), leaf(v[:, :, : c.n_prefix])
            k_band, v_band = leaf(k[:, :, c.band_lo : c.band_hi]), leaf(v[:, :, c.band_lo : c.band_hi])
            k_tail, v_tail = leaf(k[:, :, c.state_hi : c.tail_hi]), leaf(v[:, :, c.state_hi : c.tail_hi])
            s_kv_leaf, s_k_leaf = leaf(s.kv), leaf(s.k)
            o = attend_chunk(q_c, torch.cat([k_pre, k_band], dim=2), torch.cat([v_pre, v_band], dim=2),
                             _exact_keys(c, q.device), k_tail, v_tail, c.state_hi, s_kv_leaf, s_k_leaf, s.shift, c,
                             sq, sk, prefix, window, feature_map, scale)
            grads = torch.autograd.grad(o, (q_c, k_pre, v_pre, k_band, v_band, k_tail, v_tail, s_kv_leaf, s_k_leaf),
                                        grad_out[:, :, c.i0 : c.i1].to(dtype), allow_unused=True,
                                        materialize_grads=True)
        dq[:, :, c.i0 : c.i1] += grads[0]
        dk[:, :, : c.n_prefix] += grads[1]
        dv_[:, :, : c.n_prefix] += grads[2]
        dk[:, :, c.band_lo : c.band_hi] += grads[3]
        dv_[:, :, c.band_lo : c.band_hi] += grads[4]
        dk[:, :, c.state_hi : c.tail_hi] += grads[5]
        dv_[:, :, c.state_hi : c.tail_hi] += grads[6]
        g_kv, g_k = g_kv + grads[7], g_k + grads[8]
        if c.state_hi > c.absorb_lo:
            with torch.enable_grad():
                k_r, v_r = leaf(k[:, :, c.absorb_lo : c.state_hi]), leaf(v[:, :, c.absorb_lo : c.state_hi])
                gk, gv = torch.autograd.grad(absorb(k_r, v_r, feature_map, dtype, s.shift), (k_r, v_r), (g_kv, g_k))
            dk[:, :, c.absorb_lo : c.state_hi] += gk
            dv_[:, :, c.absorb_lo : c.state_hi] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv_.to(v.dtype)
