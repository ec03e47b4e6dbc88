"""Hybrid attention (exact softmax on the prefix and the window band, linear attention on the far keys, one
normalizer), fused so that no O(S^2) tensor exists. Semantics and edge cases: dsattn.reference.hybrid_attention.

Two kernels:
1. `hybrid_chunk_state_kernel`, grid (key chunks, B*Hkv, Dv blocks): each chunk's far-key sums
   sum phi(k_j)^T v_j [Dqk, Dv] and sum phi(k_j) [Dqk] over its keys j >= prefix, in fp32. The launcher turns
   them into exclusive prefix sums over chunks (torch.cumsum): state[t] = sums over far keys j < t * CHUNK.
   Memory O(S / CHUNK * Dqk * Dv).
2. `hybrid_attention_fwd_kernel`, grid (query blocks, B*Hq): flash-style online softmax over the prefix key
   blocks and the window-band key blocks (the exact keys), then, with the row max m_i now final, the far
   term added unscaled into the same accumulator: phi(q) . state[t] for the chunk boundary t at or below the
   block's first far bound, plus the few far keys between that boundary and each row's bound
   (j <= p - window) as masked phi(q) phi(k)^T blocks. The exact part is kept as e^(s - m_i) (never above 1),
   the far part is not exponentiated, exactly as the formula reads.

Feature maps "elu", "relu", "identity" are applied once in PyTorch (dsattn.reference.linear_attention.feature_map,
the single definition) and the forward kernels read phi(q), phi(k) in the input dtype. "exp" is exactly
exp(x), so e^(q_d + k_d) passes float32's range for large inputs: the kernels read q and k and apply it with
shifts that cancel. The states hold sum e^(k_d - M_d) v with M_d the running per-dim max of their keys (the
chunk kernel per chunk, `hybrid_state_scan_kernel` carrying them across chunks with rescaling); the main
kernel keeps its accumulator and normalizer in units of 2^c_i per row, c_i raised online (like a softmax max)
to the largest exponent the row forms: 0 for the exact part (its terms e^(s - m) are <= 1), max_d(q_d + M_d)
for the state, max_d(q_d + beta_d) for each tail block the row sees (beta the block's per-dim key max).

Backward (`hybrid_attention_backward`, from the forward's per-row m_i, c_i, 1 / l_i and the key holding m_i):
3. `hybrid_attention_bwd_dq_kernel`, grid (query blocks, B*Hq): dq over the exact keys FlashAttention-2 style
   (plus m_i's own gradient, on the key holding the max: m_i is part of the output because the far terms are
   not scaled by e^-m), then over the far keys from the same forward states and tail blocks as the forward.
4. `hybrid_attention_bwd_dkdv_kernel`, grid (key blocks, B*Hkv): dk, dv over the query blocks that see the
   block's keys as exact (only those blocks), and for the far part a reverse state (sums over the query
   chunks at or after the first that sees every key of the block, built by batched matmuls and the same scan
   in reverse) plus the few rows before it, masked. No [Sq, Sk] tensor anywhere.

Batch bases are 64-bit; head bases, a block's first row / key and the state chunk bases are 64-bit too when a
per-batch tensor reaches past 2^31 elements (LONG_OFFSETS, set by the launcher from shapes and strides; the
usual shapes keep int32 offsets, which hold fewer registers). Offsets within a tile stay int32.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from dsattn.reference.linear_attention import feature_map as apply_feature_map

from ._common import AOTSpec, TRITON_DTYPE as TRITON_NAME, interpreting, launch, long_offsets, ptr

CHUNK = 256  # keys per far-state chunk (multiple of BLOCK_N)
LOG2E = tl.constexpr(1.4426950408889634)
# "exp": a row's factor e^(q + beta - c) on a tail block can exceed 1 only through keys of the block the row
# does not see; capped at 2^110 (~e^76) so that a dot over 256 dims stays finite
EXP_CAP = tl.constexpr(110.0)
STATE_BLOCK_DV = 64
STATE_BLOCK_N = 64
STATE_WARPS = 8
STATE_STAGES = 2  # the chunk loop's phi(k) / v tiles arrive by cp.async while the previous block computes
STATE_BLOCK_D = 32  # Dqk slice of the phi(q) . state product in the main kernel
SCAN_BLOCK_D = 16  # Dqk rows per program of the "exp" state scan


@triton.jit
def hybrid_chunk_state_kernel(
    phik_ptr, v_ptr, kv_ptr, ksum_ptr, kmax_ptr,
    HKV, SK, DQK, DV, PREFIX,
    s_pkb, s_pkh, s_pks, s_pkd,
    s_vb, s_vh, s_vs, s_vd,
    s_kvb, s_kvh, s_kvc, s_kvd,
    s_ksb, s_ksh, s_ksc,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, LONG_OFFSETS: tl.constexpr, EXP: tl.constexpr,
):
    """EXP: phik_ptr holds k itself; the sums are of e^(k_d - M_d), M_d the chunk's max of dim d over its far
    keys (stored in kmax_ptr, -inf where none), rescaled as M grows block by block."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    pid_dv = tl.program_id(2)
    b = (bh // HKV).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = bh % HKV
    if LONG_OFFSETS:  # head and chunk bases in 64 bits
        h = h.to(tl.int64)
        chunk_l = chunk.to(tl.int64)
    else:
        chunk_l = chunk
    rd = tl.arange(0, BLOCK_DQK)
    re = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    phik_base = phik_ptr + b * s_pkb + h * s_pkh
    v_base = v_ptr + b * s_vb + h * s_vh
    kv = tl.zeros([BLOCK_DQK, BLOCK_DV], tl.float32)
    ksum = tl.zeros([BLOCK_DQK], tl.float32)
    kmax = tl.full([BLOCK_DQK], float("-inf"), tl.float32)  # EXP: running max (log2 units)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_N):
        rj = start + rn
        far = (rj >= PREFIX) & (rj < SK)
        if LONG_OFFSETS:  # the block's first key in 64 bits
            phik_blk = phik_base + tl.cast(start, tl.int64) * s_pks
            v_blk = v_base + tl.cast(start, tl.int64) * s_vs
            rk = rn
        else:
            phik_blk = phik_base
            v_blk = v_base
            rk = rj
        # phi(k)^T loaded as [Dqk, keys] so the dot needs no transpose
        v = tl.load(v_blk + rk[:, None] * s_vs + re[None, :] * s_vd,
                    mask=far[:, None] & (re[None, :] < DV), other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if EXP:
            k2 = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd,
                         mask=far[None, :] & (rd[:, None] < DQK), other=float("-inf")).to(tl.float32) * LOG2E
            kmax_new = tl.maximum(kmax, tl.max(k2, axis=1))
            kmax_safe = tl.where(kmax_new == float("-inf"), 0.0, kmax_new)
            r = tl.math.exp2(kmax - kmax_safe)
            phik_t = tl.math.exp2(k2 - kmax_safe[:, None])
            kv = kv * r[:, None] + tl.dot(phik_t.to(v.dtype), v, out_dtype=tl.float32)
            ksum = ksum * r + tl.sum(phik_t, axis=1)
            kmax = kmax_new
        else:
            phik_t = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd,
                             mask=far[None, :] & (rd[:, None] < DQK), other=0.0)
            if UPCAST:
                phik_t = phik_t.to(tl.float32)
            kv += tl.dot(phik_t, v, out_dtype=tl.float32)
            ksum += tl.sum(phik_t.to(tl.float32), axis=1)
    base = kv_ptr + b * s_kvb + h * s_kvh + chunk_l * s_kvc
    tl.store(base + rd[:, None] * s_kvd + re[None, :], kv, mask=(rd[:, None] < DQK) & (re[None, :] < DV))
    if pid_dv == 0:
        tl.store(ksum_ptr + b * s_ksb + h * s_ksh + chunk_l * s_ksc + rd, ksum, mask=rd < DQK)
        if EXP:
            tl.store(kmax_ptr + b * s_ksb + h * s_ksh + chunk_l * s_ksc + rd, kmax, mask=rd < DQK)


@triton.jit
def hybrid_state_scan_kernel(
    kv_ptr, ksum_ptr, kmax_ptr, NUM, DQK, DV,
    s_kvb, s_kvh, s_kvc, s_kvd,
    s_ksb, s_ksh, s_ksc,
    HKV, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """EXP: in place, entry c of the chunk sums (each in its own per-dim shift kmax) becomes the sum of entries
    0..c in the running max of their shifts: S = S e^(M - M') + S_c e^(m_c - M'), M' = max(M, m_c) (what
    torch.cumsum does for the other maps)."""
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)  # a tiny kernel: 64-bit bases always
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    re = tl.arange(0, BLOCK_DV)
    d_ok = rd < DQK
    kv_base = kv_ptr + b * s_kvb + h * s_kvh + rd[:, None] * s_kvd + re[None, :]
    ks_base = ksum_ptr + b * s_ksb + h * s_ksh + rd
    km_base = kmax_ptr + b * s_ksb + h * s_ksh + rd
    kv_mask = d_ok[:, None] & (re[None, :] < DV)
    kv = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    ks = tl.zeros([BLOCK_D], tl.float32)
    km = tl.full([BLOCK_D], float("-inf"), tl.float32)
    for c32 in range(0, NUM):
        c = tl.cast(c32, tl.int64)
        c_kv = tl.load(kv_base + c * s_kvc, mask=kv_mask, other=0.0)
        c_ks = tl.load(ks_base + c * s_ksc, mask=d_ok, other=0.0)
        c_km = tl.load(km_base + c * s_ksc, mask=d_ok, other=float("-inf"))
        km_new = tl.maximum(km, c_km)
        km_safe = tl.where(km_new == float("-inf"), 0.0, km_new)
        r_old = tl.math.exp2(km - km_safe)
        r_new = tl.math.exp2(c_km - km_safe)
        kv = kv * r_old[:, None] + c_kv * r_new[:, None]
        ks = ks * r_old + c_ks * r_new
        km = km_new
        tl.store(kv_base + c * s_kvc, kv, mask=kv_mask)
        tl.store(ks_base + c * s_ksc, ks, mask=d_ok)
        tl.store(km_base + c * s_ksc, km, mask=d_ok)


@triton.jit
def _exact_key_range(p_first, p_last, PREFIX, WINDOW, BLOCK_N: tl.constexpr):
    """The exact keys of query positions [p_first, p_last] as BLOCK_N blocks: the prefix [0, min(prefix,
    p_last + 1)), then the window band [max(prefix, p_first - window + 1), p_last]. Returns (blocks, prefix
    blocks, the band's first block start); the forward and the dq backward walk the same blocks."""
    prefix_hi = tl.minimum(PREFIX, p_last + 1)
    band_lo = tl.maximum(tl.maximum(PREFIX, p_first - WINDOW + 1), 0)
    band_hi = tl.where(WINDOW > 0, p_last + 1, 0)
    band_start = (band_lo // BLOCK_N) * BLOCK_N
    n_prefix_blocks = tl.cdiv(tl.maximum(prefix_hi, 0), BLOCK_N)
    n_band_blocks = tl.cdiv(tl.maximum(band_hi - band_start, 0), BLOCK_N)
    return n_prefix_blocks + n_band_blocks, n_prefix_blocks, band_start


@triton.jit
def _exact_key_block(it, n_prefix_blocks, band_start, rn, SK, BLOCK_N: tl.constexpr):
    """Block `it` of _exact_key_range's walk: (its first key, keys rj, rj < SK, whether it is a prefix block)."""
    in_prefix = it < n_prefix_blocks
    start = tl.where(in_prefix, it * BLOCK_N, band_start + (it - n_prefix_blocks) * BLOCK_N)
    rj = start + rn
    return start, rj, rj < SK, in_prefix


@triton.jit
def _exact_mask(rj, key_ok, in_prefix, pos, PREFIX, WINDOW):
    """[rows, keys]: the keys of an exact block that each row (at positions pos) takes exactly (built after
    the block's dot, so it is not held across it)."""
    visible = (rj[None, :] <= pos[:, None]) & key_ok[None, :]
    # the two ranges are disjoint: prefix blocks take j < prefix, band blocks j >= prefix
    in_set = tl.where(in_prefix, rj[None, :] < PREFIX, (rj[None, :] >= PREFIX) & (rj[None, :] > pos[:, None] - WINDOW))
    return visible & in_set


@triton.jit
def hybrid_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, phiq_ptr, phik_ptr, kv_ptr, ksum_ptr, kmax_ptr, o_ptr, stats_ptr, amax_ptr,
    HQ, GROUP, SQ, SK, DQK, DV, PREFIX, WINDOW, NUM_STATES, scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_pqb, s_pqh, s_pqs, s_pqd,
    s_pkb, s_pkh, s_pks, s_pkd,
    s_kvb, s_kvh, s_kvc, s_kvd,
    s_ksb, s_ksh, s_ksc,
    s_ob, s_oh, s_os, s_od,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, STATE_BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, LONG_OFFSETS: tl.constexpr, EXP: tl.constexpr,
    SAVE_STATS: tl.constexpr,
):
    """EXP: phiq_ptr / phik_ptr hold q / k themselves and phi = exp is applied here with shifts that cancel:
    acc and l_i are kept in units of 2^c_i per row (c_i in log2 units, raised online like a softmax max).
    SAVE_STATS (training): per row (m_i, c_i, 1 / l_i) fp32 into stats_ptr [B * Hq * Sq, 3] (m_i, c_i in log2
    units of the scaled scores) and the exact key holding m_i into amax_ptr, for the backward."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)  # batch offsets can pass 2**31 elements
    hq = bh % HQ
    hk = hq // GROUP
    ri = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = ri + (SK - SQ)  # absolute query positions
    p_first = pid_m * BLOCK_M + (SK - SQ)
    p_last = tl.minimum(p_first + BLOCK_M - 1, SK - 1)
    rd = tl.arange(0, BLOCK_DQK)
    re = tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    row_ok = ri < SQ
    dqk_ok = rd < DQK
    dv_ok = re < DV
    if LONG_OFFSETS:  # head bases and the block's first row in 64 bits
        hq = hq.to(tl.int64)
        hk = hk.to(tl.int64)
        q_rows = q_ptr + b * s_qb + hq * s_qh + (pid_m * BLOCK_M).to(tl.int64) * s_qs
        rows = tl.arange(0, BLOCK_M)
    else:
        q_rows = q_ptr + b * s_qb + hq * s_qh
        rows = ri

    q = tl.load(
        q_rows + rows[:, None] * s_qs + rd[None, :] * s_qd,
        mask=row_ok[:, None] & dqk_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    arg_i = tl.zeros([BLOCK_M], tl.int32)

    # ---- exact keys: prefix [0, min(prefix, p_last + 1)) then the window band [max(prefix, p - window + 1), p]
    n_blocks, n_prefix_blocks, band_start = _exact_key_range(p_first, p_last, PREFIX, WINDOW, BLOCK_N)
    for it in range(0, n_blocks):
        start, rj, key_ok, in_prefix = _exact_key_block(it, n_prefix_blocks, band_start, rn, SK, BLOCK_N)
        if LONG_OFFSETS:  # the block's first key in 64 bits
            k_blk = k_base + tl.cast(start, tl.int64) * s_ks
            v_blk = v_base + tl.cast(start, tl.int64) * s_vs
            rk = rn
        else:
            k_blk = k_base
            v_blk = v_base
            rk = rj
        k = tl.load(k_blk + rk[None, :] * s_ks + rd[:, None] * s_kd, mask=key_ok[None, :] & dqk_ok[:, None], other=0.0)
        v = tl.load(v_blk + rk[:, None] * s_vs + re[None, :] * s_vd, mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, out_dtype=tl.float32) * qk_scale
        s = tl.where(_exact_mask(rj, key_ok, in_prefix, pos, PREFIX, WINDOW), s, float("-inf"))
        if SAVE_STATS:  # the first key holding the row max (m_i's gradient goes to it)
            arg_i = tl.where(tl.max(s, axis=1) > m_i, tl.argmax(s, axis=1).to(tl.int32) + start, arg_i)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        m_i = m_new

    # ---- far keys: prefix <= j <= p - window, added unscaled (m_i is final now)
    far_first = p_first - WINDOW + 1  # exclusive far bound of the block's first row
    t = tl.minimum(tl.maximum(far_first, 0) // CHUNK, NUM_STATES - 1)
    far_hi = tl.minimum(p_last - WINDOW + 1, SK)
    # EXP: the common shift of num and den; the exact terms e^(s - m) are <= 1, so 0 where there are any
    c_i = tl.where(l_i > 0.0, 0.0, float("-inf"))
    if far_hi > PREFIX:
        rdc = tl.arange(0, STATE_BLOCK_D)
        if LONG_OFFSETS:
            t_l = tl.cast(t, tl.int64)
            phiq_base = phiq_ptr + b * s_pqb + hq * s_pqh + (pid_m * BLOCK_M).to(tl.int64) * s_pqs \
                + rows[:, None] * s_pqs
        else:
            t_l = t
            phiq_base = phiq_ptr + b * s_pqb + hq * s_pqh + ri[:, None] * s_pqs
        kv_base = kv_ptr + b * s_kvb + hk * s_kvh + t_l * s_kvc
        kmax_base = kmax_ptr + b * s_ksb + hk * s_ksh + t_l * s_ksc
        c_safe = c_i
        if EXP:  # raise c_i to the state's largest exponent max_d(q_d + R_d), R the state's per-dim shift
            q_st = tl.load(phiq_base + rd[None, :] * s_pqd, mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
            kmax = tl.load(kmax_base + rd, mask=dqk_ok, other=float("-inf"))
            c_new = tl.maximum(c_i, tl.max(q_st.to(tl.float32) * LOG2E + kmax[None, :], axis=1))
            c_safe = tl.where(c_new == float("-inf"), 0.0, c_new)
            alpha = tl.math.exp2(c_i - c_safe)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            c_i = c_new
        # phi(q) . state[t], reading phi(q) and the fp32 state in Dqk slices to keep registers low
        for d0 in range(0, BLOCK_DQK, STATE_BLOCK_D):
            dcols = d0 + rdc
            phiq_d = tl.load(phiq_base + dcols[None, :] * s_pqd, mask=row_ok[:, None] & (dcols[None, :] < DQK), other=0.0)
            phiq_d = phiq_d.to(tl.float32)
            if EXP:  # a dim without keys (-inf) gives 0
                kmax_d = tl.load(kmax_base + dcols, mask=dcols < DQK, other=float("-inf"))
                phiq_d = tl.math.exp2(phiq_d * LOG2E + kmax_d[None, :] - c_safe[:, None])
            kv = tl.load(kv_base + dcols[:, None] * s_kvd + re[None, :], mask=(dcols[:, None] < DQK) & dv_ok[None, :], other=0.0)
            ksum = tl.load(ksum_ptr + b * s_ksb + hk * s_ksh + t_l * s_ksc + dcols, mask=dcols < DQK, other=0.0)
            if IEEE:
                acc += tl.dot(phiq_d, kv, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc += tl.dot(phiq_d, kv, out_dtype=tl.float32)
            l_i += tl.sum(phiq_d * ksum[None, :], axis=1)
        # the far keys between boundary t * CHUNK and each row's own bound
        phiq = tl.load(phiq_base + rd[None, :] * s_pqd, mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
        if UPCAST:
            phiq = phiq.to(tl.float32)
        phik_base = phik_ptr + b * s_pkb + hk * s_pkh
        far_lo = tl.maximum(t * CHUNK, (PREFIX // BLOCK_N) * BLOCK_N)
        for start in range(far_lo, far_hi, BLOCK_N):
            rj = start + rn
            if LONG_OFFSETS:
                phik_blk = phik_base + tl.cast(start, tl.int64) * s_pks
                v_blk = v_base + tl.cast(start, tl.int64) * s_vs
                rk = rn
            else:
                phik_blk = phik_base
                v_blk = v_base
                rk = rj
            v = tl.load(v_blk + rk[:, None] * s_vs + re[None, :] * s_vd, mask=(rj[:, None] < SK) & dv_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if EXP:
                # per-dim shift beta: the block's max over its tail keys (finite ones: a NaN / inf key stays out
                # of the other rows); c_i rises only for rows that see a key of the block
                tail = (rj >= PREFIX) & (rj < far_hi)
                k2 = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd, mask=tail[None, :] & dqk_ok[:, None],
                             other=float("-inf")).to(tl.float32) * LOG2E
                beta = tl.max(tl.where(k2 < float("inf"), k2, float("-inf")), axis=1)
                beta_safe = tl.where(beta == float("-inf"), 0.0, beta)
                sees = pos - WINDOW >= tl.maximum(start, PREFIX)
                q2 = phiq.to(tl.float32) * LOG2E
                c_new = tl.where(sees, tl.maximum(c_i, tl.max(q2 + beta[None, :], axis=1)), c_i)
                c_safe = tl.where(c_new == float("-inf"), 0.0, c_new)
                alpha = tl.math.exp2(c_i - c_safe)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                c_i = c_new
                # (a dim without tail keys has phik = 0 there: phiq_e needs no mask)
                phiq_e = tl.math.exp2(tl.minimum(q2 + beta_safe[None, :] - c_safe[:, None], EXP_CAP))
                phik = tl.math.exp2(k2 - beta_safe[:, None])
                a = tl.dot(phiq_e.to(v.dtype), phik.to(v.dtype), out_dtype=tl.float32)
            else:
                phik = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd, mask=(rj[None, :] < SK) & dqk_ok[:, None], other=0.0)
                if UPCAST:
                    phik = phik.to(tl.float32)
                a = tl.dot(phiq, phik, out_dtype=tl.float32)
            far = (rj[None, :] >= PREFIX) & (rj[None, :] <= pos[:, None] - WINDOW)
            a = tl.where(far, a, 0.0)
            l_i += tl.sum(a, axis=1)
            acc += tl.dot(a.to(v.dtype), v, out_dtype=tl.float32)

    # a zero denominator (no visible key, or far products summing to 0) gives a 0 row, never NaN
    den_ok = l_i != 0.0
    out = acc / tl.where(den_ok, l_i, 1.0)[:, None]
    out = tl.where(den_ok[:, None], out, 0.0)
    if SAVE_STATS:
        srow = (b * HQ + hq) * SQ + ri
        tl.store(stats_ptr + srow * 3, m_i, mask=row_ok)
        tl.store(stats_ptr + srow * 3 + 1, tl.where(c_i == float("-inf"), 0.0, c_i), mask=row_ok)
        tl.store(stats_ptr + srow * 3 + 2, tl.where(den_ok, 1.0 / tl.where(den_ok, l_i, 1.0), 0.0), mask=row_ok)
        tl.store(amax_ptr + srow, arg_i, mask=row_ok)
    if LONG_OFFSETS:
        o_rows = o_ptr + b * s_ob + hq * s_oh + (pid_m * BLOCK_M).to(tl.int64) * s_os
    else:
        o_rows = o_ptr + b * s_ob + hq * s_oh
    tl.store(
        o_rows + rows[:, None] * s_os + re[None, :] * s_od,
        out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :],
    )


# ------------------------------------------------------------------------------------------------ backward
# Per row i the forward saved m_i, c_i (log2 units) and 1 / l_i, l_i the normalizer in units of 2^c_i (c = 0
# except for "exp"), so an exact key's weight over the row's denominator is P_ij = 2^(s_ij - m_i - c_i) / l_i
# and a far key's is F_ij = phi(q_i).phi(k_j) 2^-c_i / l_i. With dP = dO_i . v_j - Delta_i (Delta_i = dO_i . o_i):
#   exact: dv_j += P dO_i, ds_ij = P dP (+ the m_i term on the key holding the max: -sum_E ds_ij), dq/dk via scale
#   far:   dv_j += F dO_i, dphi(q_i) = sum_j dP phi(k_j) / D_i, dphi(k_j) = sum_i dP phi(q_i) / D_i
# The far sums over whole chunks use states: forward ones (sum phi(k)^T v, sum phi(k)) for dq, and reverse ones
# over query chunks (sum phi(q) e^-c dO / l, sum phi(q) e^-c Delta / l) for dk / dv; "exp" keeps both in
# per-dim shifts as the forward does (the key side's e^(k + rho) <= 1: every row in a reverse state sees the key).
FEATURES = {"elu": 0, "relu": 1, "exp": 2, "identity": 3}


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """phi(x) in fp32 for the maps applied as written (elu + 1, relu, identity)."""
    if FEATURE == 0:
        return tl.where(x > 0.0, x + 1.0, tl.math.exp2(tl.minimum(x, 0.0) * LOG2E))
    elif FEATURE == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """phi'(x) in fp32 (elu + 1, relu, identity)."""
    if FEATURE == 0:
        return tl.where(x > 0.0, 1.0, tl.math.exp2(tl.minimum(x, 0.0) * LOG2E))
    elif FEATURE == 1:
        return tl.where(x > 0.0, 1.0, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def hybrid_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, stats_ptr, amax_ptr, kv_ptr, ksum_ptr, kmax_ptr, dq_ptr, gm_ptr,
    HQ, GROUP, SQ, SK, DQK, DV, PREFIX, WINDOW, NUM_STATES, scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_dob, s_doh, s_dos, s_dod,
    s_kvb, s_kvh, s_kvc, s_kvd,
    s_ksb, s_ksh, s_ksc,
    s_dqb, s_dqh, s_dqs, s_dqd,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, STATE_BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dq of one query block: the exact keys FlashAttention-2 style (and m_i's term on the key holding the max,
    whose sum -sum_E ds goes to gm_ptr for dk), then the far keys: the forward state of the block's chunk
    boundary and the tail keys, as the forward reads them."""
    EXP: tl.constexpr = FEATURE == 2
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    hq = (bh % HQ).to(tl.int64)
    hk = hq // GROUP
    ri = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = ri + (SK - SQ)
    r64 = ri.to(tl.int64)  # row / key offsets in 64 bits: the backward takes any tensor size
    p_first = pid_m * BLOCK_M + (SK - SQ)
    p_last = tl.minimum(p_first + BLOCK_M - 1, SK - 1)
    rd = tl.arange(0, BLOCK_DQK)
    re = tl.arange(0, BLOCK_DV)
    rn = tl.arange(0, BLOCK_N)
    row_ok = ri < SQ
    dqk_ok = rd < DQK
    dv_ok = re < DV
    q = tl.load(q_ptr + b * s_qb + hq * s_qh + r64[:, None] * s_qs + rd[None, :] * s_qd,
                mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
    do = tl.load(do_ptr + b * s_dob + hq * s_doh + r64[:, None] * s_dos + re[None, :] * s_dod,
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    srow = (b * HQ + hq) * SQ + ri
    m2 = tl.load(stats_ptr + srow * 3, mask=row_ok, other=float("-inf"))
    c2 = tl.load(stats_ptr + srow * 3 + 1, mask=row_ok, other=0.0)
    inv_l = tl.load(stats_ptr + srow * 3 + 2, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + srow, mask=row_ok, other=0.0)
    m_base = tl.where(m2 == float("-inf"), 0.0, m2) + c2
    k_base = k_ptr + b * s_kb + hk * s_kh
    v_base = v_ptr + b * s_vb + hk * s_vh
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    ds_sum = tl.zeros([BLOCK_M], tl.float32)

    # ---- exact keys (the forward's loop)
    n_blocks, n_prefix_blocks, band_start = _exact_key_range(p_first, p_last, PREFIX, WINDOW, BLOCK_N)
    for it in range(0, n_blocks):
        start, rj, key_ok, in_prefix = _exact_key_block(it, n_prefix_blocks, band_start, rn, SK, BLOCK_N)
        j64 = rj.to(tl.int64)
        k = tl.load(k_base + j64[:, None] * s_ks + rd[None, :] * s_kd, mask=key_ok[:, None] & dqk_ok[None, :], other=0.0)
        vt = tl.load(v_base + j64[None, :] * s_vs + re[:, None] * s_vd, mask=key_ok[None, :] & dv_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * qk_scale
        exact = _exact_mask(rj, key_ok, in_prefix, pos, PREFIX, WINDOW)
        p = tl.where(exact, tl.math.exp2(s - m_base[:, None]), 0.0) * inv_l[:, None]
        dp = tl.dot(do, vt, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        ds_sum += tl.sum(ds, axis=1)
        dq += tl.dot((ds * scale).to(k.dtype), k, out_dtype=tl.float32)
    # m_i = max_E s_ij: its gradient -sum_E ds_ij lands on the key holding the max
    gm = -ds_sum
    a_i = tl.load(amax_ptr + srow, mask=row_ok, other=0)
    has_exact = (m2 != float("-inf")) & row_ok
    k_a = tl.load(k_base + a_i[:, None].to(tl.int64) * s_ks + rd[None, :] * s_kd, mask=has_exact[:, None] & dqk_ok[None, :],
                  other=0.0).to(tl.float32)
    dq += (gm * scale)[:, None] * k_a
    tl.store(gm_ptr + srow, tl.where(has_exact, gm, 0.0), mask=row_ok)

    # ---- far keys: prefix <= j <= p - window
    far_first = p_first - WINDOW + 1
    t = tl.minimum(tl.maximum(far_first, 0) // CHUNK, NUM_STATES - 1)
    far_hi = tl.minimum(p_last - WINDOW + 1, SK)
    if far_hi > PREFIX:
        # fp32 views of q are recomputed where used (not held across the loops: registers)
        kv_base = kv_ptr + b * s_kvb + hk * s_kvh + t.to(tl.int64) * s_kvc
        ks_base = ksum_ptr + b * s_ksb + hk * s_ksh + t.to(tl.int64) * s_ksc
        km_base = kmax_ptr + b * s_ksb + hk * s_ksh + t.to(tl.int64) * s_ksc
        # state: dphi(q)_d = (S[d] . dO - z_d Delta) / D, S [Dqk, Dv] read in Dv slices (as S^T [slice, Dqk])
        res = tl.arange(0, STATE_BLOCK_D)
        st = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
        for e0 in range(0, BLOCK_DV, STATE_BLOCK_D):
            ecols = e0 + res
            do_e = tl.load(do_ptr + b * s_dob + hq * s_doh + r64[:, None] * s_dos + ecols[None, :] * s_dod,
                           mask=row_ok[:, None] & (ecols[None, :] < DV), other=0.0).to(tl.float32)
            kv_t = tl.load(kv_base + rd[None, :] * s_kvd + ecols[:, None], mask=dqk_ok[None, :] & (ecols[:, None] < DV),
                           other=0.0)
            if IEEE:
                st += tl.dot(do_e, kv_t, input_precision="ieee", out_dtype=tl.float32)
            else:
                st += tl.dot(do_e, kv_t, out_dtype=tl.float32)
        z = tl.load(ks_base + rd, mask=dqk_ok, other=0.0)
        st = (st - delta[:, None] * z[None, :]) * inv_l[:, None]
        if EXP:
            kmax = tl.load(km_base + rd, mask=dqk_ok, other=float("-inf"))
            mult = tl.where(kmax[None, :] == float("-inf"), 0.0,
                            tl.math.exp2(q.to(tl.float32) * LOG2E + kmax[None, :] - c2[:, None]))
        else:
            mult = _dphi(q.to(tl.float32), FEATURE)
        dq += mult * st
        # tail keys between the boundary and each row's bound
        far_lo = tl.maximum(t * CHUNK, (PREFIX // BLOCK_N) * BLOCK_N)
        for start in range(far_lo, far_hi, BLOCK_N):
            rj = start + rn
            j64 = rj.to(tl.int64)
            tail = (rj >= PREFIX) & (rj < far_hi)
            vt = tl.load(v_base + j64[None, :] * s_vs + re[:, None] * s_vd, mask=tail[None, :] & dv_ok[:, None], other=0.0)
            if UPCAST:
                vt = vt.to(tl.float32)
            if EXP:
                k2 = tl.load(k_base + j64[None, :] * s_ks + rd[:, None] * s_kd, mask=tail[None, :] & dqk_ok[:, None],
                             other=float("-inf")).to(tl.float32) * LOG2E
                beta = tl.max(tl.where(k2 < float("inf"), k2, float("-inf")), axis=1)
                beta_safe = tl.where(beta == float("-inf"), 0.0, beta)
                # (a dim without tail keys has phik = 0 there: mult needs no mask)
                mult = tl.math.exp2(tl.minimum(q.to(tl.float32) * LOG2E + beta_safe[None, :] - c2[:, None], EXP_CAP))
                phik = tl.math.exp2(k2 - beta_safe[:, None])
            else:
                kt = tl.load(k_base + j64[None, :] * s_ks + rd[:, None] * s_kd, mask=tail[None, :] & dqk_ok[:, None],
                             other=0.0).to(tl.float32)
                phik = tl.where(tail[None, :], _phi(kt, FEATURE), 0.0)
                mult = _dphi(q.to(tl.float32), FEATURE)
            far = (rj[None, :] >= PREFIX) & (rj[None, :] <= pos[:, None] - WINDOW)
            dp = tl.dot(do, vt, out_dtype=tl.float32)
            df = tl.where(far, dp - delta[:, None], 0.0) * inv_l[:, None]
            dq += mult * tl.dot(df.to(vt.dtype), tl.trans(phik).to(vt.dtype), out_dtype=tl.float32)
    tl.store(dq_ptr + b * s_dqb + hq * s_dqh + r64[:, None] * s_dqs + rd[None, :] * s_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & dqk_ok[None, :])


@triton.jit
def hybrid_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, stats_ptr, u_ptr, usum_ptr, umax_ptr, dk_ptr, dv_ptr,
    HKV, GROUP, SQ, SK, DQK, DV, PREFIX, WINDOW, NUM_RSTATES, scale,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_dob, s_doh, s_dos, s_dod,
    s_ub, s_uh, s_uc, s_ud,
    s_usb, s_ush, s_usc,
    s_dkb, s_dkh, s_dks, s_dkd,
    s_dvb, s_dvh, s_dvs, s_dvd,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, STATE_BLOCK_D: tl.constexpr,
    FEATURE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dk, dv of one key block (all q heads of its kv head): the exact part over the query blocks that see its
    keys as exact (every later row for prefix keys, the window's rows for band keys), FlashAttention-2 style;
    the far part from the reverse state of the rows that see every key of the block as far (position >= its
    last key + window, rounded up to a chunk) plus the few rows in between, masked."""
    EXP: tl.constexpr = FEATURE == 2
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = (bh % HKV).to(tl.int64)
    j0 = pid_n * BLOCK_N
    rj = j0 + tl.arange(0, BLOCK_N)
    j64 = rj.to(tl.int64)  # row / key offsets in 64 bits: the backward takes any tensor size
    rd = tl.arange(0, BLOCK_DQK)
    re = tl.arange(0, BLOCK_DV)
    rm = tl.arange(0, BLOCK_M)
    key_ok = rj < SK
    dqk_ok = rd < DQK
    dv_ok = re < DV
    k = tl.load(k_ptr + b * s_kb + hk * s_kh + j64[:, None] * s_ks + rd[None, :] * s_kd,
                mask=key_ok[:, None] & dqk_ok[None, :], other=0.0)
    v = tl.load(v_ptr + b * s_vb + hk * s_vh + j64[:, None] * s_vs + re[None, :] * s_vd,
                mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k32 = k.to(tl.float32)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    j_last = tl.minimum(j0 + BLOCK_N, SK) - 1
    shift = SK - SQ  # row i sits at position i + shift

    # ---- exact: rows at positions [j0, hi): every later one for prefix keys, p < j + window for band keys
    ex_hi = tl.where(j0 < PREFIX, SK, tl.where(WINDOW > 0, tl.minimum(j_last + WINDOW, SK), j0))
    row_lo = tl.maximum(j0 - shift, 0)
    row_hi = tl.maximum(ex_hi - shift, 0)
    # ---- far: rows at positions >= max(j0, prefix) + window; from t_r * CHUNK on, the reverse state
    jf_lo = tl.maximum(j0, PREFIX)
    has_far = jf_lo <= j_last
    t_r = tl.minimum(tl.cdiv(j_last + WINDOW, CHUNK), NUM_RSTATES - 1)
    tail_lo = tl.maximum(jf_lo + WINDOW - shift, 0)
    tail_hi = tl.where(has_far, tl.maximum(tl.minimum(t_r * CHUNK, SK) - shift, 0), 0)
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        q_head = q_ptr + b * s_qb + hq * s_qh
        do_head = do_ptr + b * s_dob + hq * s_doh
        st_head = (b * HKV * GROUP + hq) * SQ
        for m0 in range((row_lo // BLOCK_M) * BLOCK_M, row_hi, BLOCK_M):
            ri = m0 + rm
            row_ok = (ri < SQ) & (ri >= 0)
            pos = ri + shift
            q = tl.load(q_head + ri[:, None].to(tl.int64) * s_qs + rd[None, :] * s_qd, mask=row_ok[:, None] & dqk_ok[None, :], other=0.0)
            do = tl.load(do_head + ri[:, None].to(tl.int64) * s_dos + re[None, :] * s_dod, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            m2 = tl.load(stats_ptr + (st_head + ri) * 3, mask=row_ok, other=float("-inf"))
            c2 = tl.load(stats_ptr + (st_head + ri) * 3 + 1, mask=row_ok, other=0.0)
            inv_l = tl.load(stats_ptr + (st_head + ri) * 3 + 2, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + st_head + ri, mask=row_ok, other=0.0)
            m_base = tl.where(m2 == float("-inf"), 0.0, m2) + c2
            st = tl.dot(k, tl.trans(q), out_dtype=tl.float32) * qk_scale  # [keys, rows]
            exact = (rj[:, None] <= pos[None, :]) & key_ok[:, None] & row_ok[None, :] & \
                ((rj[:, None] < PREFIX) | (rj[:, None] > pos[None, :] - WINDOW))
            pt = tl.where(exact, tl.math.exp2(st - m_base[None, :]), 0.0) * inv_l[None, :]
            dv += tl.dot(pt.to(do.dtype), do, out_dtype=tl.float32)
            dpt = tl.dot(v, tl.trans(do), out_dtype=tl.float32)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot((dst * scale).to(q.dtype), q, out_dtype=tl.float32)
        # far rows between the block's first far row and the reverse state's boundary, masked
        for m0 in range((tail_lo // BLOCK_M) * BLOCK_M, tail_hi, BLOCK_M):
            ri = m0 + rm
            row_ok = (ri < SQ) & (ri >= 0) & (ri < tail_hi)
            pos = ri + shift
            q = tl.load(q_head + ri[:, None].to(tl.int64) * s_qs + rd[None, :] * s_qd, mask=row_ok[:, None] & dqk_ok[None, :],
                        other=0.0).to(tl.float32)
            do = tl.load(do_head + ri[:, None].to(tl.int64) * s_dos + re[None, :] * s_dod, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            c2 = tl.load(stats_ptr + (st_head + ri) * 3 + 1, mask=row_ok, other=0.0)
            inv_l = tl.load(stats_ptr + (st_head + ri) * 3 + 2, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + st_head + ri, mask=row_ok, other=0.0)
            far = (rj[:, None] >= PREFIX) & (rj[:, None] <= pos[None, :] - WINDOW) & key_ok[:, None] & row_ok[None, :]
            if EXP:
                # per-dim shift rho over the block's rows: e^(q - c - rho) <= 1, e^(k + rho) capped
                x = tl.where(row_ok[:, None] & dqk_ok[None, :], q * LOG2E - c2[:, None], float("-inf"))
                rho = tl.max(x, axis=0)
                rho_safe = tl.where(rho == float("-inf"), 0.0, rho)
                phq = tl.math.exp2(x - rho_safe[None, :])
                phk = tl.where(key_ok[:, None] & (rho[None, :] != float("-inf")),
                               tl.math.exp2(tl.minimum(k32 * LOG2E + rho_safe[None, :], EXP_CAP)), 0.0)
                mult = phk
            else:
                phq = tl.where(row_ok[:, None] & dqk_ok[None, :], _phi(q, FEATURE), 0.0)
                phk = _phi(k32, FEATURE)
                mult = _dphi(k32, FEATURE)
            at = tl.where(far, tl.dot(phk.to(do.dtype), tl.trans(phq).to(do.dtype), out_dtype=tl.float32), 0.0)
            dv += tl.dot((at * inv_l[None, :]).to(do.dtype), do, out_dtype=tl.float32)
            dpt = tl.dot(v, tl.trans(do), out_dtype=tl.float32)
            dft = tl.where(far, dpt - delta[None, :], 0.0) * inv_l[None, :]
            dk += mult * tl.dot(dft.to(do.dtype), phq.to(do.dtype), out_dtype=tl.float32)
    # reverse state t_r: U [Dqk, Dv] = sum phi(q) e^-c dO / l, u [Dqk] = sum phi(q) e^-c Delta / l over rows at
    # positions >= t_r * CHUNK (all q heads of the group), "exp" in the per-dim shift rho (e^(q - c - rho))
    if has_far:
        u_base = u_ptr + b * s_ub + hk * s_uh + t_r.to(tl.int64) * s_uc
        us_base = usum_ptr + b * s_usb + hk * s_ush + t_r.to(tl.int64) * s_usc
        um_base = umax_ptr + b * s_usb + hk * s_ush + t_r.to(tl.int64) * s_usc
        if EXP:
            rho = tl.load(um_base + rd, mask=dqk_ok, other=float("-inf"))
            mult = tl.where(rho[None, :] == float("-inf"), 0.0,
                            tl.math.exp2(tl.minimum(k32 * LOG2E + rho[None, :], EXP_CAP)))
            phk = mult
        else:
            phk = _phi(k32, FEATURE)
            mult = _dphi(k32, FEATURE)
        far_key = key_ok & (rj >= PREFIX)
        phk = tl.where(far_key[:, None], phk, 0.0)
        mult = tl.where(far_key[:, None], mult, 0.0)
        # dv += phi(k) U (Dqk slices); dphi(k) = v U^T - u (Dv slices)
        rsd = tl.arange(0, STATE_BLOCK_D)
        dphik = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
        for e0 in range(0, BLOCK_DV, STATE_BLOCK_D):
            ecols = e0 + rsd
            v_e = tl.load(v_ptr + b * s_vb + hk * s_vh + j64[:, None] * s_vs + ecols[None, :] * s_vd,
                          mask=key_ok[:, None] & (ecols[None, :] < DV), other=0.0).to(tl.float32)
            u_t = tl.load(u_base + rd[None, :] * s_ud + ecols[:, None], mask=dqk_ok[None, :] & (ecols[:, None] < DV),
                          other=0.0)
            if IEEE:
                dphik += tl.dot(v_e, u_t, input_precision="ieee", out_dtype=tl.float32)
            else:
                dphik += tl.dot(v_e, u_t, out_dtype=tl.float32)
        usum = tl.load(us_base + rd, mask=dqk_ok, other=0.0)
        dk += mult * (dphik - usum[None, :])
        for d0 in range(0, BLOCK_DQK, STATE_BLOCK_D):
            dcols = d0 + rsd
            k_d = tl.load(k_ptr + b * s_kb + hk * s_kh + j64[:, None] * s_ks + dcols[None, :] * s_kd,
                          mask=far_key[:, None] & (dcols[None, :] < DQK), other=0.0).to(tl.float32)
            if EXP:
                rho_d = tl.load(um_base + dcols, mask=dcols < DQK, other=float("-inf"))
                phk_d = tl.where(far_key[:, None] & (rho_d[None, :] != float("-inf")),
                                 tl.math.exp2(tl.minimum(k_d * LOG2E + rho_d[None, :], EXP_CAP)), 0.0)
            else:
                phk_d = tl.where(far_key[:, None] & (dcols[None, :] < DQK), _phi(k_d, FEATURE), 0.0)
            u_d = tl.load(u_base + dcols[:, None] * s_ud + re[None, :], mask=(dcols[:, None] < DQK) & dv_ok[None, :],
                          other=0.0)
            if IEEE:
                dv += tl.dot(phk_d, u_d, input_precision="ieee", out_dtype=tl.float32)
            else:
                dv += tl.dot(phk_d, u_d, out_dtype=tl.float32)
    tl.store(dk_ptr + b * s_dkb + hk * s_dkh + j64[:, None] * s_dks + rd[None, :] * s_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=key_ok[:, None] & dqk_ok[None, :])
    tl.store(dv_ptr + b * s_dvb + hk * s_dvh + j64[:, None] * s_dvs + re[None, :] * s_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=key_ok[:, None] & dv_ok[None, :])


HEAD_BLOCKS = (64, 128, 256)  # padded head dims the kernels are built for (aot_specs lists each)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _head_block(n: int) -> int:
    return max(HEAD_BLOCKS[0], triton.next_power_of_2(n))


def fwd_config(block_dqk: int, block_dv: int, dtype: torch.dtype, exp: bool = False) -> dict:
    """Block sizes and warps of the main kernel for padded head dims and dtype. BLOCK_M = 64 with 8 warps: the
    kernel holds the softmax accumulator, a phi(q) . state slice and the far-key tiles at once, and
    BLOCK_M = 128 reaches 255 registers at D = 128 (measured with the AOT check). "exp" also holds the shifted
    fp32 feature tiles: smaller blocks."""
    wide = max(block_dqk, block_dv) >= 256 or dtype == torch.float32
    if exp:  # 16 rows at head dim >= 128: no spill (32 rows spill a few bytes there)
        if max(block_dqk, block_dv) >= 128:
            return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        # two stages: with one, sm_80 spills 8 bytes at the 16-aligned loads the JIT compiles for
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2}


def hybrid_attention(q, k, v, *, prefix: int, window: int, feature_map: str, scale: float, out=None) -> torch.Tensor:
    """Launch the kernels. q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv]: any strides, one dtype;
    validation is done by dsattn.ops.hybrid_attention. `out` (optional) receives the result."""
    return _forward(q, k, v, prefix, window, feature_map, scale, out, None, None)


def hybrid_attention_fwd_stats(q, k, v, *, prefix: int, window: int, feature_map: str, scale: float):
    """The training forward: (out, stats fp32 [B, Hq, Sq, 3] = (m, c, 1 / l) per row, amax int32 [B, Hq, Sq]),
    what hybrid_attention_backward recomputes the weights from."""
    b, hq, sq = q.shape[:3]
    out = torch.empty((b, hq, sq, v.shape[3]), dtype=q.dtype, device=q.device)
    stats = torch.zeros((b, hq, sq, 3), dtype=torch.float32, device=q.device)
    amax = torch.zeros((b, hq, sq), dtype=torch.int32, device=q.device)
    _forward(q, k, v, prefix, window, feature_map, scale, out, stats, amax)
    return out, stats, amax


def _forward(q, k, v, prefix, window, feature_map, scale, out, stats, amax):
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    exp = feature_map == "exp"
    # "exp" is applied in the kernels (with shifts); the other maps once here, in the input dtype
    phi_q, phi_k = (q, k) if exp else (apply_feature_map(q, feature_map), apply_feature_map(k, feature_map))
    block_dqk, block_dv = _head_block(dqk), _head_block(dv)
    upcast = interpreting() and q.dtype == torch.bfloat16
    kv_state, k_state, k_max, num_chunks = _far_states(phi_k, v, prefix, exp, upcast)
    cfg = fwd_config(block_dqk, block_dv, q.dtype, exp)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)
    launch(hybrid_attention_fwd_kernel)[grid](
        q, k, v, phi_q, phi_k, kv_state, k_state, k_max, out,
        k_state if stats is None else stats,  # unread stand-ins without stats
        torch.empty(0, dtype=torch.int32, device=q.device) if amax is None else amax,
        hq, hq // hkv, sq, sk, dqk, dv, prefix, window, num_chunks, scale,
        *q.stride(), *k.stride(), *v.stride(), *phi_q.stride(), *phi_k.stride(),
        *kv_state.stride()[:4], *k_state.stride()[:3], *out.stride(),
        CHUNK=CHUNK, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, STATE_BLOCK_D=STATE_BLOCK_D,
        UPCAST=upcast, IEEE=q.dtype == torch.float32,
        LONG_OFFSETS=long_offsets(*(t[0] for t in (q, k, v, phi_q, phi_k, kv_state, k_state, out))), EXP=exp,
        SAVE_STATS=stats is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _far_states(phi_k, v, prefix: int, exp: bool, upcast: bool):
    """(kv_state, k_state, k_max, num_chunks): states[:, :, t] = far sums over keys [prefix, t * CHUNK) for
    t = 0 .. num_chunks - 1 (the ones read); for "exp" (phi_k is k) in the per-dim shift k_max[:, :, t] (log2
    units, -inf: no key yet)."""
    b, hkv, sk, dqk = phi_k.shape
    dv = v.shape[3]
    num_chunks = max(1, triton.cdiv(sk, CHUNK))
    kv_state = torch.zeros((b, hkv, num_chunks, dqk, dv), dtype=torch.float32, device=v.device)
    k_state = torch.zeros((b, hkv, num_chunks, dqk), dtype=torch.float32, device=v.device)
    k_max = torch.full((b, hkv, num_chunks, dqk), float("-inf"), dtype=torch.float32, device=v.device) if exp \
        else k_state  # unread stand-in
    first = prefix // CHUNK  # chunks before it hold no far key: their states stay 0
    n = num_chunks - 1 - first  # chunk c's sums land in state c + 1; the last chunk's are never read
    if n > 0:
        kv_sums, k_sums, max_sums = kv_state[:, :, first + 1:], k_state[:, :, first + 1:], k_max[:, :, first + 1:]
        phik_c, v_c = phi_k[:, :, first * CHUNK:], v[:, :, first * CHUNK:]
        launch(hybrid_chunk_state_kernel)[(n, b * hkv, triton.cdiv(dv, STATE_BLOCK_DV))](
            phik_c, v_c, kv_sums, k_sums, max_sums,
            hkv, phik_c.shape[2], dqk, dv, prefix - first * CHUNK,
            *phik_c.stride(), *v_c.stride(), *kv_sums.stride()[:4], *k_sums.stride()[:3],
            CHUNK=CHUNK, BLOCK_N=STATE_BLOCK_N, BLOCK_DQK=_head_block(dqk), BLOCK_DV=STATE_BLOCK_DV, UPCAST=upcast,
            # per batch: batch bases are already 64-bit
            LONG_OFFSETS=long_offsets(*(t[0] for t in (phik_c, v_c, kv_sums, k_sums))), EXP=exp,
            num_warps=STATE_WARPS, num_stages=STATE_STAGES,
        )
        if exp:  # per-chunk sums -> prefix sums, each rescaled to the running max of the shifts
            launch(hybrid_state_scan_kernel)[(b * hkv, triton.cdiv(dqk, SCAN_BLOCK_D))](
                kv_sums, k_sums, max_sums, n, dqk, dv, *kv_sums.stride()[:4], *k_sums.stride()[:3], hkv,
                BLOCK_D=SCAN_BLOCK_D, BLOCK_DV=_head_block(dv),
            )
        else:
            kv_sums.cumsum_(dim=2)  # per-chunk sums -> exclusive prefix sums over chunks
            k_sums.cumsum_(dim=2)
    return kv_state, k_state, k_max, num_chunks


def bwd_config(block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """Block sizes of the backward kernels: 32 rows x 32 keys for dq (it also holds dq, dO and the far part's
    fp32 tiles) and for dk / dv (dk, dv and the key tiles), 8 warps; 16-bit runs two stages (cp.async of the
    next block's tiles; no spill on sm_80 / sm_90 at head dims 64 and 128)."""
    return {"BLOCK_M": 32, "BLOCK_N": 32, "DKDV_BLOCK_M": 32, "DKDV_BLOCK_N": 32,
            "num_warps": 8, "num_stages": 1 if dtype == torch.float32 else 2}


def hybrid_attention_backward(grad_out, q, k, v, out, stats, amax, *, prefix: int, window: int, feature_map: str,
                              scale: float):
    """(dq, dk, dv) from hybrid_attention_fwd_stats's (out, stats, amax); no [Sq, Sk] tensor: the far sums go
    through chunk states (forward ones for dq, reverse ones over query chunks for dk / dv)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    exp = feature_map == "exp"
    feature = FEATURES[feature_map]
    block_dqk, block_dv = _head_block(dqk), _head_block(dv)
    upcast = interpreting() and q.dtype == torch.bfloat16
    ieee = q.dtype == torch.float32
    cfg = bwd_config(block_dqk, block_dv, q.dtype)
    grad_out = grad_out.to(q.dtype)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [B, Hq, Sq]
    stats = stats.contiguous()

    # dq (and the m_i term's sum per row)
    phi_k = k if exp else apply_feature_map(k, feature_map)
    kv_state, k_state, k_max, num_chunks = _far_states(phi_k, v, prefix, exp, upcast)
    dq = torch.empty((b, hq, sq, dqk), dtype=q.dtype, device=q.device)
    gm = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    launch(hybrid_attention_bwd_dq_kernel)[(triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)](
        q, k, v, grad_out, delta, stats, amax, kv_state, k_state, k_max, dq, gm,
        hq, group, sq, sk, dqk, dv, prefix, window, num_chunks, scale,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *kv_state.stride()[:4], *k_state.stride()[:3],
        *dq.stride(),
        CHUNK=CHUNK, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        STATE_BLOCK_D=STATE_BLOCK_D, FEATURE=feature, UPCAST=upcast, IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    # dk, dv
    u, u_sum, u_max, num_rstates = _reverse_states(q, grad_out, delta, stats, hkv, sk, feature_map, upcast)
    dk = torch.empty((b, hkv, sk, dqk), dtype=torch.float32, device=q.device)
    dv_ = torch.empty((b, hkv, sk, dv), dtype=v.dtype, device=q.device)
    launch(hybrid_attention_bwd_dkdv_kernel)[(triton.cdiv(sk, cfg["DKDV_BLOCK_N"]), b * hkv)](
        q, k, v, grad_out, delta, stats, u, u_sum, u_max, dk, dv_,
        hkv, group, sq, sk, dqk, dv, prefix, window, num_rstates, scale,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *u.stride()[:4], *u_sum.stride()[:3],
        *dk.stride(), *dv_.stride(),
        CHUNK=CHUNK, BLOCK_M=cfg["DKDV_BLOCK_M"], BLOCK_N=cfg["DKDV_BLOCK_N"], BLOCK_DQK=block_dqk,
        BLOCK_DV=block_dv, STATE_BLOCK_D=STATE_BLOCK_D, FEATURE=feature, UPCAST=upcast, IEEE=ieee,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # m_i = max_E s_ij is part of the output (the far terms are not scaled by e^-m): its gradient goes to the
    # key holding the max, dk[a_i] += scale gm_i q_i (dq's share was added in the kernel)
    heads = (torch.arange(b, device=q.device)[:, None] * hkv + torch.arange(hq, device=q.device)[None, :] // group)
    rows = (heads[..., None] * sk + amax.long()).reshape(-1)
    dk.view(-1, dqk).index_add_(0, rows, ((gm * scale)[..., None] * q.float()).reshape(-1, dqk))
    return dq, dk.to(k.dtype), dv_


def _reverse_states(q, grad_out, delta, stats, hkv: int, sk: int, feature_map: str, upcast: bool):
    """(u, u_sum, u_max, num_rstates): u[:, :, t] = sum phi(q_i) e^-c_i (dO_i / l_i)^T [Dqk, Dv] and u_sum[:, :, t]
    = sum phi(q_i) e^-c_i Delta_i / l_i over the rows at positions >= t * CHUNK of the kv head's q heads,
    t = 0 .. cdiv(Sk, CHUNK) (the last one empty); for "exp" e^(q - c - u_max) with u_max[:, :, t] the per-dim
    max of q - c over those rows (log2 units). Chunk sums by batched matmuls, then a suffix scan over chunks."""
    b, hq, sq, dqk = q.shape
    dv = grad_out.shape[3]
    group = hq // hkv
    exp = feature_map == "exp"
    shift = sk - sq
    first, pad = shift // CHUNK, shift % CHUNK
    n = triton.cdiv(pad + sq, CHUNK)  # chunks holding rows: first .. first + n - 1 = cdiv(Sk, CHUNK) - 1
    num_rstates = first + n + 1
    c2, inv_l = stats[..., 1], stats[..., 2]
    fill = float("-inf") if exp else 0.0
    x = q.float() * LOG2E.value - c2[..., None] if exp else apply_feature_map(q.float(), feature_map)
    rows = n * CHUNK

    def chunked(t, value):  # [B, Hq, Sq, D] -> [B, Hkv, n, G * CHUNK, D], rows at their positions
        t = torch.nn.functional.pad(t, (0, 0, pad, rows - pad - sq), value=value)
        return t.view(b, hkv, group, n, CHUNK, -1).transpose(2, 3).reshape(b, hkv, n, group * CHUNK, -1)

    x = chunked(x, fill)
    y = chunked(grad_out.float() * inv_l[..., None], 0.0)
    w = chunked((delta * inv_l)[..., None], 0.0)
    if exp:
        x_max = x.amax(dim=3)  # [B, Hkv, n, Dqk]
        x = torch.exp2(x - torch.where(x_max == float("-inf"), 0.0, x_max)[:, :, :, None])
    sums = x.transpose(-1, -2) @ y  # [B, Hkv, n, Dqk, Dv]
    sums_k = (x * w).sum(dim=3)
    # suffix sums: reversed chunk order, the forward's prefix scan, back
    sums, sums_k = sums.flip(2).contiguous(), sums_k.flip(2).contiguous()
    if exp:
        x_max = x_max.flip(2).contiguous()
        launch(hybrid_state_scan_kernel)[(b * hkv, triton.cdiv(dqk, SCAN_BLOCK_D))](
            sums, sums_k, x_max, n, dqk, dv, *sums.stride()[:4], *sums_k.stride()[:3], hkv,
            BLOCK_D=SCAN_BLOCK_D, BLOCK_DV=_head_block(dv),
        )
    else:
        sums.cumsum_(dim=2)
        sums_k.cumsum_(dim=2)
        x_max = sums_k
    # state t <= first: every row (chunk first's suffix, flipped index n - 1); the last (t = first + n): none
    index = n - 1 - (torch.arange(num_rstates - 1, device=q.device).clamp(min=first) - first)
    u = torch.zeros((b, hkv, num_rstates, dqk, dv), dtype=torch.float32, device=q.device)
    u_sum = torch.zeros((b, hkv, num_rstates, dqk), dtype=torch.float32, device=q.device)
    u[:, :, :-1] = sums.index_select(2, index)
    u_sum[:, :, :-1] = sums_k.index_select(2, index)
    u_max = u_sum  # unread stand-in
    if exp:
        u_max = torch.full((b, hkv, num_rstates, dqk), float("-inf"), dtype=torch.float32, device=q.device)
        u_max[:, :, :-1] = x_max.index_select(2, index)
    return u, u_sum, u_max, num_rstates


def _int_args(*names):
    return {n: "i32" for n in names}


def _strides(prefix, dims="bhsd"):
    # the last-dim stride is 1 on the hot path (contiguous or [B, S, H, D] views): Triton's launcher
    # specializes an int argument equal to 1 into a constant, so the AOT check compiles that variant
    return _int_args(*(f"s_{prefix}{d}" for d in dims[:-1]))


def _aligned(signature: dict) -> tuple[str, ...]:
    """What the JIT sees as multiples of 16 at the usual head dims (tt.divisibility): pointers, row / head /
    chunk strides and the head dims; without it the tile loads stay narrow and cannot be cp.async."""
    return tuple(name for name, kind in signature.items()
                 if kind.startswith("*") or (kind == "i32" and name.startswith("s_")) or name in ("DQK", "DV"))



def aot_specs() -> list[AOTSpec]:
    """Every config the launcher can pick: dtype x padded (Dqk, Dv) for the main kernel, dtype x padded Dqk for
    the state kernel. Hot (must not spill): 16-bit dtypes with the head dims DeepSeek/Llama/Qwen use
    (64/64, 128/128, MLA's 192->256 / 128)."""
    hot_dims = {(64, 64), (128, 128), (256, 128)}
    specs = []
    for dtype in DTYPES:
        t = ptr(dtype)
        half = dtype != torch.float32
        for block_dqk in HEAD_BLOCKS:
            specs.append(AOTSpec(
                name=f"chunk_state_{TRITON_NAME[dtype]}_dqk{block_dqk}",
                kernel=hybrid_chunk_state_kernel,
                signature={"phik_ptr": t, "v_ptr": t, "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "kmax_ptr": "*fp32",
                           **_int_args("HKV", "SK", "DQK", "DV", "PREFIX"), **_strides("pk"), **_strides("v"),
                           **_strides("kv", "bhcd"), **_int_args("s_ksb", "s_ksh", "s_ksc")},
                constexprs={"CHUNK": CHUNK, "BLOCK_N": STATE_BLOCK_N, "BLOCK_DQK": block_dqk, "BLOCK_DV": STATE_BLOCK_DV,
                            "UPCAST": False, "LONG_OFFSETS": False, "EXP": False,
                            **{n: 1 for n in ("s_pkd", "s_vd", "s_kvd")}},
                num_warps=STATE_WARPS, num_stages=STATE_STAGES,
                hot=half,
            ))
            for block_dv in HEAD_BLOCKS:
                if dtype == torch.float16 and (block_dqk, block_dv) not in hot_dims:
                    continue  # not held to no-spill: compiles and sizes shared memory as its bf16 twin does
                cfg = fwd_config(block_dqk, block_dv, dtype)
                specs.append(AOTSpec(
                    name=f"fwd_{TRITON_NAME[dtype]}_dqk{block_dqk}_dv{block_dv}",
                    kernel=hybrid_attention_fwd_kernel,
                    signature={
                        "q_ptr": t, "k_ptr": t, "v_ptr": t, "phiq_ptr": t, "phik_ptr": t,
                        "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "kmax_ptr": "*fp32", "o_ptr": t,
                        "stats_ptr": "*fp32", "amax_ptr": "*i32",
                        **_int_args("HQ", "GROUP", "SQ", "SK", "DQK", "DV", "PREFIX", "WINDOW", "NUM_STATES"),
                        "scale": "fp32",
                        **_strides("q"), **_strides("k"), **_strides("v"), **_strides("pq"), **_strides("pk"),
                        **_strides("kv", "bhcd"), **_int_args("s_ksb", "s_ksh", "s_ksc"), **_strides("o"),
                    },
                    constexprs={"CHUNK": CHUNK, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                "BLOCK_DQK": block_dqk, "BLOCK_DV": block_dv, "STATE_BLOCK_D": STATE_BLOCK_D,
                                "UPCAST": False, "IEEE": not half, "LONG_OFFSETS": False, "EXP": False,
                                "SAVE_STATS": False, **{n: 1 for n in ("s_qd", "s_kd", "s_vd", "s_pqd", "s_pkd", "s_kvd", "s_od")}},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    hot=half and (block_dqk, block_dv) in hot_dims,
                ))
    # "exp" (phi applied in the kernels with shifts) in bf16 at the usual head dims, and its state scan
    exp_names = {"chunk_state_bf16_dqk64", "chunk_state_bf16_dqk128", "fwd_bf16_dqk64_dv64", "fwd_bf16_dqk128_dv128"}
    for spec in list(specs):
        if spec.name in exp_names:
            exp_spec = dataclasses.replace(spec, name=spec.name + "_exp", constexprs={**spec.constexprs, "EXP": True})
            if spec.kernel is hybrid_attention_fwd_kernel:
                cfg = fwd_config(spec.constexprs["BLOCK_DQK"], spec.constexprs["BLOCK_DV"], torch.bfloat16, True)
                exp_spec.constexprs.update(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                exp_spec.num_warps, exp_spec.num_stages = cfg["num_warps"], cfg["num_stages"]
            specs.append(exp_spec)
    for block_dv in (64, 128):
        specs.append(AOTSpec(
            name=f"state_scan_dv{block_dv}", kernel=hybrid_state_scan_kernel,
            signature={"kv_ptr": "*fp32", "ksum_ptr": "*fp32", "kmax_ptr": "*fp32",
                       **_int_args("NUM", "DQK", "DV", "s_kvb", "s_kvh", "s_kvc", "s_kvd", "s_ksb", "s_ksh", "s_ksc",
                                   "HKV")},
            constexprs={"BLOCK_D": SCAN_BLOCK_D, "BLOCK_DV": block_dv}, num_warps=4, num_stages=1,
        ))
    # backward: dq and dk / dv kernels in bf16 at head dims 64 and 128, "elu" (phi in the kernel) and "exp"
    for dtype in (torch.bfloat16,):
        t = ptr(dtype)
        for block_dqk, block_dv in ((64, 64), (128, 128)):
            cfg = bwd_config(block_dqk, block_dv, dtype)
            common = {"CHUNK": CHUNK, "BLOCK_DQK": block_dqk, "BLOCK_DV": block_dv, "STATE_BLOCK_D": STATE_BLOCK_D,
                      "UPCAST": False, "IEEE": False}
            for fmap in ("elu", "exp"):
                suffix = f"{TRITON_NAME[dtype]}_dqk{block_dqk}_dv{block_dv}_{fmap}"
                specs.append(AOTSpec(
                    name=f"bwd_dq_{suffix}", kernel=hybrid_attention_bwd_dq_kernel,
                    signature={
                        "q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "delta_ptr": "*fp32", "stats_ptr": "*fp32",
                        "amax_ptr": "*i32", "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "kmax_ptr": "*fp32", "dq_ptr": t,
                        "gm_ptr": "*fp32",
                        **_int_args("HQ", "GROUP", "SQ", "SK", "DQK", "DV", "PREFIX", "WINDOW", "NUM_STATES"),
                        "scale": "fp32",
                        **_strides("q"), **_strides("k"), **_strides("v"), **_strides("do"), **_strides("kv", "bhcd"),
                        **_int_args("s_ksb", "s_ksh", "s_ksc"), **_strides("dq"),
                    },
                    constexprs={**common, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                "FEATURE": FEATURES[fmap],
                                **{n: 1 for n in ("s_qd", "s_kd", "s_vd", "s_dod", "s_kvd", "s_dqd")}},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                ))
                specs.append(AOTSpec(
                    name=f"bwd_dkdv_{suffix}", kernel=hybrid_attention_bwd_dkdv_kernel,
                    signature={
                        "q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "delta_ptr": "*fp32", "stats_ptr": "*fp32",
                        "u_ptr": "*fp32", "usum_ptr": "*fp32", "umax_ptr": "*fp32", "dk_ptr": "*fp32", "dv_ptr": t,
                        **_int_args("HKV", "GROUP", "SQ", "SK", "DQK", "DV", "PREFIX", "WINDOW", "NUM_RSTATES"),
                        "scale": "fp32",
                        **_strides("q"), **_strides("k"), **_strides("v"), **_strides("do"), **_strides("u", "bhcd"),
                        **_int_args("s_usb", "s_ush", "s_usc"), **_strides("dk"), **_strides("dv"),
                    },
                    constexprs={**common, "BLOCK_M": cfg["DKDV_BLOCK_M"], "BLOCK_N": cfg["DKDV_BLOCK_N"],
                                "FEATURE": FEATURES[fmap],
                                **{n: 1 for n in ("s_qd", "s_kd", "s_vd", "s_dod", "s_ud", "s_dkd", "s_dvd")}},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                ))
    # The pipelined kernels' specs carry the alignment their tile loads rely on (see _aligned).
    specs = [dataclasses.replace(spec, divisible_by_16=_aligned(spec.signature))
             if spec.kernel in (hybrid_chunk_state_kernel, hybrid_attention_fwd_kernel, hybrid_attention_bwd_dq_kernel,
                                hybrid_attention_bwd_dkdv_kernel) else spec for spec in specs]
    # The 64-bit variants compile too (a rare path: not held to the no-spill rule).
    specs += [dataclasses.replace(spec, name=spec.name + "_long", hot=False,
                                  constexprs={**spec.constexprs, "LONG_OFFSETS": True})
              for spec in list(specs) if spec.name in ("chunk_state_bf16_dqk128", "fwd_bf16_dqk128_dv128",
                                                       "fwd_bf16_dqk256_dv128")]
    return specs
