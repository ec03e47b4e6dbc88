"""Sliding-window attention (flash-attention style) for dsattn.sliding_window_attention[_varlen].

Three kernels share one inner loop (`_attend_key_range`: online softmax in base 2 over a key range):
- `sliding_window_attention_fwd_kernel` (prefill, chunked prefill, varlen): one program per (query block, query head); the key
  loop runs over [lo, hi), the keys the block's window can reach, so the cost is O(Sq x window), not
  O(Sq x Sk). GQA reads kv head h // groups (K/V are never repeated). Varlen packs sequences along the
  token dim and finds each sequence's bounds in cu_seqlens.
- `sliding_window_attention_decode_split_kernel` + `sliding_window_attention_decode_combine_kernel` (decode, groups x Sq <= 64): flash-decoding. One
  program per (key split, kv head) handles all the kv head's query heads and rows at once (rows = groups x
  Sq), over its slice of the window's key range only, so the cost does not grow with the cache beyond the
  window; the combine kernel merges the splits' (output, log-sum-exp) pairs and the sink.
- Training: the prefill kernel with WRITE_LSE saves each row's base-2 log-sum-exp, and the FlashAttention-2
  style backward (`..._bwd_preprocess_kernel`, `..._bwd_dkdv_kernel`, `..._bwd_dq_kernel`) recomputes the
  probabilities from it over the window's blocks only; varlen runs the same kernels per sequence.
Head dims are padded to powers of two with masks (up to 256); any strides; fp16/bf16/fp32 (fp32 dots as
tf32x3: fp32-accurate on tensor cores). Visibility is SPEC's: query i at p = i + Sk - Sq sees
p - window < j <= p (causal) or |p - j| < window (causal=False); `sinks` add e^(sink - m) to the
denominator; rows with no key output 0. Offsets are 64-bit where they grow with the sequence (a block's
first row / key) when a tensor reaches past 2^31 elements (LONG_OFFSETS, set by the launchers; the
usual shapes keep int32 offsets, which hold fewer registers).
"""


import dataclasses

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, interpreting, launch, long_offsets, ptr

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_range(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    q_pos, row_valid, lo, hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, TF32X3: tl.constexpr,
    LONG_OFFSETS: tl.constexpr,
):
    """Online softmax (base 2) of the rows' scores over keys [lo, hi) (hi <= the sequence's length) into
    (acc, l_i, m_i). MASKED=False is for blocks every row sees completely (the window's interior): no
    visibility mask, no bounds on the key loads."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        if LONG_OFFSETS:  # Sk x the key stride passes 2^31: the block's first key in 64 bits
            k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kn + offs_n[None, :] * stride_kn \
                + offs_dqk[:, None] * stride_kd
            v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vn + offs_n[:, None] * stride_vn \
                + offs_dv[None, :] * stride_vd
        else:
            k_ptrs = k_base + cols[None, :] * stride_kn + offs_dqk[:, None] * stride_kd
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=col_ok[None, :] & (offs_dqk[:, None] < DQK), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_dqk[:, None] < DQK, other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
            k = k.to(tl.float32)
        if TF32X3:
            s = tl.dot(q, k, input_precision="tf32x3", out_dtype=tl.float32)
        else:
            s = tl.dot(q, k, out_dtype=tl.float32)
        s = s * qk_scale_log2
        if MASKED:
            visible = (cols[None, :] > q_pos[:, None] - window) & col_ok[None, :] & row_valid[:, None]
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_pos[:, None])
            else:
                visible = visible & (cols[None, :] < q_pos[:, None] + window)
            s = tl.where(visible, s, float("-inf"))
            v_mask = col_ok[:, None] & (offs_dv[None, :] < DV)
        else:
            visible = None
            v_mask = offs_dv[None, :] < DV
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v_ptrs, v_mask, visible, MASKED, UPCAST, TF32X3)
    return acc, l_i, m_i


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, v_ptrs, v_mask, visible, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                         TF32X3: tl.constexpr, V_LOADED: tl.constexpr = False):
    """One key tile of the online softmax (base 2): s the tile's scaled scores, its values loaded from v_ptrs
    (after the scores' exponentials: the value tile is not live across them). MASKED: s is -inf where
    `visible` is False (a row may have seen no key yet) and a value row may not be finite; else every row
    sees every key of the tile. V_LOADED: v_ptrs is the value tile [BLOCK_N, BLOCK_DV] itself, already loaded
    (zero where it holds no value; e.g. a view of the key tile: MLA's values are the keys' first columns), and
    v_mask is unused. Returns the new (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_LOADED:
        v = v_ptrs
    else:
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
        v = v.to(tl.float32)
    if MASKED:
        # p = 0 times a NaN/Inf value is NaN: a value row that is not finite enters the dot zeroed, and its
        # NaN moves into p only where a row sees that key (only those rows' outputs get it).
        v_nan = tl.sum(v.to(tl.float32) * 0.0, 1)  # NaN where the key's value row is not finite
        v_bad = v_nan != v_nan
        v = tl.where(v_bad[:, None], 0.0, v)
        p = tl.where(visible & v_bad[None, :], float("nan"), p)
    acc = acc * alpha[:, None]
    if TF32X3:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=tl.float32)
    return acc, l_i, m_new


@triton.jit
def _finish_rows(acc, l_i, m_i, sink_log2, HAS_SINKS: tl.constexpr):
    """acc / (l + e^(sink - m)); rows with an empty denominator give 0."""
    if HAS_SINKS:
        m_fin = tl.maximum(m_i, sink_log2)
        rescale = tl.exp2(m_i - m_fin)  # m_i = -inf (no key) -> 0
        acc = acc * rescale[:, None]
        l_i = l_i * rescale + tl.exp2(sink_log2 - m_fin)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None]


@triton.jit
def _row_lse(l_i, m_i, sink_log2, HAS_SINKS: tl.constexpr):
    """Base-2 log-sum-exp of a row from (l, m) and the sink; +inf where the denominator is empty (so that
    2^(s - lse) = 0 in the backward)."""
    if HAS_SINKS:
        m_fin = tl.maximum(m_i, sink_log2)
        l_i = l_i * tl.exp2(m_i - m_fin) + tl.exp2(sink_log2 - m_fin)
    else:
        m_fin = m_i
    return tl.where(l_i > 0, m_fin + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))


@triton.jit
def sliding_window_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, sinks_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    HQ, GROUPS, SEQ_Q, SEQ_K, DQK, DV, window, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, TF32X3: tl.constexpr, LONG_OFFSETS: tl.constexpr, WRITE_LSE: tl.constexpr = False,
):
    """WRITE_LSE (for the backward): also store each row's log-sum-exp in base 2,
    lse[b, h, i] = log2(sum_j 2^(scale log2(e) s_ij) + 2^(log2(e) sink)) (the natural one times log2(e)),
    +inf for a row with an empty denominator, into a contiguous fp32 [B, HQ, SEQ_Q] (varlen: [HQ, SEQ_Q] with
    SEQ_Q the packed token count)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HQ
    head = pid_bh % HQ
    kv_head = head // GROUPS
    if IS_VARLEN:  # batch = sequence; tokens start at cu_seqlens[batch]; batch strides are 0
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        seqlen_q = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
        k_start = tl.load(cu_seqlens_k_ptr + batch)
        seqlen_k = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    else:
        q_start = 0
        seqlen_q = SEQ_Q
        k_start = 0
        seqlen_k = SEQ_K
    m_first = pid_m * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = offs_m < seqlen_q
    q_pos = offs_m + (seqlen_k - seqlen_q)
    if LONG_OFFSETS:  # the block's first row in 64 bits
        q_start = q_start + m_first.to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
    else:
        rows = offs_m
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_start * stride_qs
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_dqk[None, :] * stride_qd,
                mask=row_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # Keys the block's window can reach, aligned down to BLOCK_N (positions of rows m_first..m_last).
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    lo = tl.maximum(m_first + (seqlen_k - seqlen_q) - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(m_last + (seqlen_k - seqlen_q) + 1, seqlen_k)
    else:
        hi = tl.minimum(m_last + (seqlen_k - seqlen_q) + window, seqlen_k)
    hi = tl.where(m_first < seqlen_q, hi, lo)  # varlen grids cover the longest sequence: idle blocks
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start * stride_ks
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start * stride_vs
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Key blocks every row of the block sees completely run without masks: [full_lo, full_hi). The edges of
    # the window ([lo, full_lo): its trailing edge; [full_hi, hi): the diagonal / sequence end) run masked.
    p_first = m_first + (seqlen_k - seqlen_q)
    p_last = m_first + BLOCK_M - 1 + (seqlen_k - seqlen_q)
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N)
    if CAUSAL:
        full_hi = tl.minimum(p_first + 1, seqlen_k)
    else:
        full_hi = tl.minimum(p_first + window, seqlen_k)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    no_full = (full_hi <= full_lo) | (m_first + BLOCK_M > seqlen_q) | (p_first < 0)
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        q_pos, row_valid, lo, full_lo, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
        CAUSAL, True, BLOCK_N, UPCAST, TF32X3, LONG_OFFSETS,
    )
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        q_pos, row_valid, full_lo, full_hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
        CAUSAL, False, BLOCK_N, UPCAST, TF32X3, LONG_OFFSETS,
    )
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        q_pos, row_valid, full_hi, hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
        CAUSAL, True, BLOCK_N, UPCAST, TF32X3, LONG_OFFSETS,
    )
    sink_log2 = 0.0
    if HAS_SINKS:
        sink_log2 = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    out = _finish_rows(acc, l_i, m_i, sink_log2, HAS_SINKS)
    if WRITE_LSE:
        lse = _row_lse(l_i, m_i, sink_log2, HAS_SINKS)
        if IS_VARLEN:  # [HQ, SEQ_Q] over the packed tokens (q_start + rows: the block's tokens)
            lse_rows = lse_ptr + head.to(tl.int64) * SEQ_Q + q_start + rows
        else:
            lse_rows = lse_ptr + (batch * HQ + head).to(tl.int64) * SEQ_Q + offs_m
        tl.store(lse_rows, lse, mask=row_valid)
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + q_start * stride_os
    tl.store(o_base + rows[:, None] * stride_os + offs_dv[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def sliding_window_attention_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    HKV, GROUPS, SEQ_Q, SEQ_K, DQK, DV, window, qk_scale_log2, key_lo, keys_per_split, NUM_SPLITS,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, TF32X3: tl.constexpr,
    LONG_OFFSETS: tl.constexpr,
):
    """Partial attention of the rows (query head g, query i) of one kv head over one split of the window's
    key range. Partials: o_part [B, HQ, SEQ_Q, NUM_SPLITS, BLOCK_DV] (normalized), lse_part [B, HQ, SEQ_Q,
    NUM_SPLITS] (base 2, -inf for a split that saw nothing), both fp32 and contiguous."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HKV
    kv_head = pid_bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUPS * SEQ_Q
    head = kv_head * GROUPS + rows // SEQ_Q  # query head of each row
    qi = rows % SEQ_Q
    q_pos = qi + (SEQ_K - SEQ_Q)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + qi * stride_qs
    q = tl.load(q_rows[:, None] + offs_dqk[None, :] * stride_qd,
                mask=row_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = key_lo + split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, SEQ_K)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_key_range(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        q_pos, row_valid, lo, hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
        CAUSAL, True, BLOCK_N, UPCAST, TF32X3, LONG_OFFSETS,
    )
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
    part_row = ((batch * (HKV * GROUPS) + head) * SEQ_Q + qi).to(tl.int64) * NUM_SPLITS + split
    tl.store(o_part_ptr + part_row[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=row_valid[:, None])
    tl.store(lse_part_ptr + part_row, lse, mask=row_valid)


@triton.jit
def sliding_window_attention_decode_combine_kernel(
    o_part_ptr, lse_part_ptr, o_ptr, sinks_ptr,
    stride_ob, stride_oh, stride_os, stride_od,
    HQ, SEQ_Q, DV, NUM_SPLITS,
    HAS_SINKS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = sum_s 2^(lse_s - lse) o_s with lse = log2(sum_s 2^lse_s + 2^sink): one program per row."""
    row = tl.program_id(0)  # (batch * HQ + head) * SEQ_Q + qi
    qi = row % SEQ_Q
    head = (row // SEQ_Q) % HQ
    batch = row // (SEQ_Q * HQ)
    splits = tl.arange(0, BLOCK_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = splits < NUM_SPLITS
    lse = tl.load(lse_part_ptr + row.to(tl.int64) * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_SINKS:
        sink_log2 = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink_log2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m_safe)
    denom = tl.sum(weights, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink_log2 - m_safe)
    parts = tl.load(o_part_ptr + (row.to(tl.int64) * NUM_SPLITS + splits[:, None]) * BLOCK_DV + offs_dv[None, :],
                    mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    o = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + qi * stride_os
    tl.store(o + offs_dv * stride_od, out.to(o_ptr.dtype.element_ty), mask=offs_dv < DV)


# ----------------------------------------------------------------------------------------- backward
# FlashAttention-2's backward from the forward's base-2 log-sum-exp: P = 2^(scale log2(e) s - lse) is
# recomputed per tile, dS = P (dP - delta) with delta = rowsum(dO O). dK/dV: one program per (key block,
# kv head) looping over the group's query heads (no atomics) and only the query blocks whose window reaches
# the key block; dQ: one program per (query block, query head) over the window's key blocks. As in the
# forward, tiles every row/key pair of which is visible run without masks.
@triton.jit
def sliding_window_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    HQ, SEQ_Q, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O in fp32, contiguous [B, HQ, SEQ_Q]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HQ
    head = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < DV)
    o = tl.load(o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(do_ptr + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dos + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * SEQ_Q + offs_m, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _dot(a, b, acc, TF32X3: tl.constexpr):
    if TF32X3:
        return tl.dot(a, b, acc, input_precision="tf32x3", out_dtype=tl.float32)
    return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _visible(rows_pos, cols, row_ok, col_ok, window, CAUSAL: tl.constexpr):
    """[rows, cols] visibility (SPEC's rule) with bounds."""
    vis = (cols[None, :] > rows_pos[:, None] - window) & row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        vis = vis & (cols[None, :] <= rows_pos[:, None])
    else:
        vis = vis & (cols[None, :] < rows_pos[:, None] + window)
    return vis


@triton.jit
def _load_tile(base, stride_s, stride_d, idx, idx_ok, offs_d, D, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """The [len(idx), BLOCK_D] tile of rows idx (64-bit offsets) of a [S, D] view at base, zero past D and,
    MASKED, where not idx_ok: the backward's q / dO (by rows) and k / v (by keys) tiles. UPCAST: bf16 to fp32
    for the interpreter's tl.dot."""
    ptrs = base + idx[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d
    if MASKED:
        x = tl.load(ptrs, mask=idx_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dkdv_query_range(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
    cols, col_ok, lo, hi, seqlen_q, q_offset, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
    TF32X3: tl.constexpr,
):
    """Adds one query head's rows [lo, hi) to the key block's (dk, dv), transposed ([keys, rows]) tiles.
    dk is left unscaled (times scale at the end). MASKED=False: every row/key pair is visible, in bounds."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = _load_tile(q_base, stride_qs, stride_qd, rows, row_ok, offs_dqk, DQK, MASKED, UPCAST)
        do = _load_tile(do_base, stride_dos, stride_dod, rows, row_ok, offs_dv, DV, MASKED, UPCAST)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), TF32X3)
        p_t = tl.exp2(s_t * qk_scale_log2 - lse[None, :])
        if MASKED:
            vis_t = tl.trans(_visible(rows + q_offset, cols, row_ok, col_ok, window, CAUSAL))
            p_t = tl.where(vis_t, p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, TF32X3)
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), TF32X3)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:
            ds_t = tl.where(vis_t, ds_t, 0.0)
        dk = _dot(ds_t.to(q.dtype), q, dk, TF32X3)
    return dk, dv


@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seq, SEQ_Q, SEQ_K, IS_VARLEN: tl.constexpr):
    """(first q token, q length, first k token, k length) of sequence `seq`: from cu_seqlens (varlen; 64-bit
    starts) or the padded shape (starts 0)."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        seqlen_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        k_start = tl.load(cu_seqlens_k_ptr + seq)
        seqlen_k = tl.load(cu_seqlens_k_ptr + seq + 1) - k_start
        return q_start.to(tl.int64), seqlen_q, k_start.to(tl.int64), seqlen_k
    else:
        return 0, SEQ_Q, 0, SEQ_K


@triton.jit
def sliding_window_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    HKV, GROUPS, SEQ_Q, SEQ_K, DQK, DV, window, qk_scale, qk_scale_log2,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, TF32X3: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """dK, dV of one key block of one kv head: the sum over its GROUPS query heads. lse/delta: contiguous
    fp32 [B, HQ, SEQ_Q] (lse in base 2, as the forward writes it). IS_VARLEN: batch is the sequence (as in
    the forward: tokens from cu_seqlens, batch strides 0), lse/delta are [HQ, SEQ_Q] over the packed tokens
    (SEQ_Q their count), and the grid covers the longest sequence's keys (idle blocks store nothing)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HKV
    kv_head = pid_bh % HKV
    q_start, seqlen_q, k_start, seqlen_k = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, SEQ_Q, SEQ_K,
                                                     IS_VARLEN)
    n_first = pid_n * BLOCK_N
    cols = n_first + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen_k
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start * stride_ks,
                   stride_ks, stride_kd, cols, col_ok, offs_dqk, DQK, True, UPCAST)
    v = _load_tile(v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start * stride_vs,
                   stride_vs, stride_vd, cols, col_ok, offs_dv, DV, True, UPCAST)
    q_offset = seqlen_k - seqlen_q  # query row i sits at position i + q_offset
    n_last = tl.minimum(n_first + BLOCK_N, seqlen_k) - 1
    # Rows whose window reaches the block: positions [n_first (- window + 1), n_last + window - 1].
    if CAUSAL:
        lo = tl.maximum(n_first - q_offset, 0)
    else:
        lo = tl.maximum(n_first - window + 1 - q_offset, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n_last + window - q_offset, seqlen_q)
    hi = tl.maximum(hi, lo)
    if IS_VARLEN:
        hi = tl.where(n_first < seqlen_k, hi, lo)  # a block past this sequence's keys
    # Row blocks that see every key of the block: first position >= the last key (causal) or
    # last key - window + 1 (symmetric), and at least 0; last position <= first key + window - 1.
    if CAUSAL:
        need = n_first + BLOCK_N - 1
    else:
        need = n_first + BLOCK_N - window
    need = tl.maximum(need, 0)
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(need - q_offset, 0), BLOCK_M) * BLOCK_M)
    full_hi = (tl.maximum(tl.minimum(n_first + window - q_offset, seqlen_q), 0) // BLOCK_M) * BLOCK_M
    no_full = (full_hi <= full_lo) | (n_first + BLOCK_N > seqlen_k)
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUPS):
        head = kv_head * GROUPS + g
        q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_start * stride_qs
        do_base = do_ptr + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + q_start * stride_dos
        if IS_VARLEN:
            row_base = head.to(tl.int64) * SEQ_Q + q_start
        else:
            row_base = (batch * HKV * GROUPS + head).to(tl.int64) * SEQ_Q
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, stride_qs, stride_qd,
            stride_dos, stride_dod, cols, col_ok, lo, full_lo, seqlen_q, q_offset, window, qk_scale_log2,
            offs_dqk, offs_dv, DQK, DV, CAUSAL, True, BLOCK_M, UPCAST, TF32X3)
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, stride_qs, stride_qd,
            stride_dos, stride_dod, cols, col_ok, full_lo, full_hi, seqlen_q, q_offset, window, qk_scale_log2,
            offs_dqk, offs_dv, DQK, DV, CAUSAL, False, BLOCK_M, UPCAST, TF32X3)
        dk, dv = _dkdv_query_range(
            dk, dv, k, v, q_base, do_base, lse_ptr + row_base, delta_ptr + row_base, stride_qs, stride_qd,
            stride_dos, stride_dod, cols, col_ok, full_hi, hi, seqlen_q, q_offset, window, qk_scale_log2,
            offs_dqk, offs_dv, DQK, DV, CAUSAL, True, BLOCK_M, UPCAST, TF32X3)
    dk = dk * qk_scale
    tl.store(dk_ptr + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh + k_start * stride_dks
             + cols[:, None].to(tl.int64) * stride_dks + offs_dqk[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_dqk[None, :] < DQK))
    tl.store(dv_ptr + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh + k_start * stride_dvs
             + cols[:, None].to(tl.int64) * stride_dvs + offs_dv[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_key_range(
    dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
    q_pos, row_valid, lo, hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    TF32X3: tl.constexpr,
):
    """Adds keys [lo, hi) to the rows' dq (unscaled). MASKED=False: every pair visible, keys in bounds."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = _load_tile(k_base, stride_ks, stride_kd, cols, col_ok, offs_dqk, DQK, MASKED, UPCAST)
        v = _load_tile(v_base, stride_vs, stride_vd, cols, col_ok, offs_dv, DV, MASKED, UPCAST)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), TF32X3)
        p = tl.exp2(s * qk_scale_log2 - lse[:, None])
        if MASKED:
            vis = _visible(q_pos, cols, row_valid, col_ok, window, CAUSAL)
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), TF32X3)
        ds = p * (dp - delta[:, None])
        if MASKED:
            ds = tl.where(vis, ds, 0.0)
            # ds = 0 times a NaN/Inf key is NaN: keys enter dq's dot zeroed where not finite (a row that sees
            # such a key has a NaN ds already)
            k = tl.where((k == k) & (tl.abs(k.to(tl.float32)) < float("inf")), k, 0.0)
        dq = _dot(ds.to(k.dtype), k, dq, TF32X3)
    return dq


@triton.jit
def sliding_window_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HQ, GROUPS, SEQ_Q, SEQ_K, DQK, DV, window, qk_scale, qk_scale_log2,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, TF32X3: tl.constexpr, IS_VARLEN: tl.constexpr = False,
):
    """dQ of one query block of one query head over the key blocks its window reaches (as the forward).
    IS_VARLEN: as the dK/dV kernel's."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // HQ
    head = pid_bh % HQ
    kv_head = head // GROUPS
    q_start, seqlen_q, k_start, seqlen_k = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, SEQ_Q, SEQ_K,
                                                     IS_VARLEN)
    m_first = pid_m * BLOCK_M
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = offs_m < seqlen_q
    q_pos = offs_m + (seqlen_k - seqlen_q)
    q = _load_tile(q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + q_start * stride_qs,
                   stride_qs, stride_qd, offs_m, row_valid, offs_dqk, DQK, True, UPCAST)
    do = _load_tile(do_ptr + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + q_start * stride_dos,
                    stride_dos, stride_dod, offs_m, row_valid, offs_dv, DV, True, UPCAST)
    if IS_VARLEN:
        row_base = head.to(tl.int64) * SEQ_Q + q_start
    else:
        row_base = pid_bh.to(tl.int64) * SEQ_Q
    lse = tl.load(lse_ptr + row_base + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(delta_ptr + row_base + offs_m, mask=row_valid, other=0.0)
    # The forward's key range and its unmasked interior.
    m_last = tl.minimum(m_first + BLOCK_M, seqlen_q) - 1
    lo = tl.maximum(m_first + (seqlen_k - seqlen_q) - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(m_last + (seqlen_k - seqlen_q) + 1, seqlen_k)
    else:
        hi = tl.minimum(m_last + (seqlen_k - seqlen_q) + window, seqlen_k)
    hi = tl.maximum(hi, lo)
    if IS_VARLEN:
        hi = tl.where(m_first < seqlen_q, hi, lo)  # a block past this sequence's queries
    p_first = m_first + (seqlen_k - seqlen_q)
    p_last = m_first + BLOCK_M - 1 + (seqlen_k - seqlen_q)
    full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N)
    if CAUSAL:
        full_hi = tl.minimum(p_first + 1, seqlen_k)
    else:
        full_hi = tl.minimum(p_first + window, seqlen_k)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    no_full = (full_hi <= full_lo) | (m_first + BLOCK_M > seqlen_q) | (p_first < 0)
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start * stride_ks
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start * stride_vs
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    dq = _dq_key_range(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                       q_pos, row_valid, lo, full_lo, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
                       CAUSAL, True, BLOCK_N, UPCAST, TF32X3)
    dq = _dq_key_range(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                       q_pos, row_valid, full_lo, full_hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
                       CAUSAL, False, BLOCK_N, UPCAST, TF32X3)
    dq = _dq_key_range(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                       q_pos, row_valid, full_hi, hi, window, qk_scale_log2, offs_dqk, offs_dv, DQK, DV,
                       CAUSAL, True, BLOCK_N, UPCAST, TF32X3)
    dq = dq * qk_scale
    tl.store(dq_ptr + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + q_start * stride_dqs
             + offs_m[:, None].to(tl.int64) * stride_dqs + offs_dqk[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_dqk[None, :] < DQK))


# ----------------------------------------------------------------------------------------- configs
def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def fwd_config(block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """Prefill tiles per padded head dim and dtype: in 16 bit 128 query rows (two warpgroups' wgmma on sm_90)
    with 2-3 stages of pipelined (cp.async) key/value tiles up to head dim 128, 64 x 32 beyond. fp32 (tf32x3
    splits each operand in two) gets smaller row tiles. Each choice is one AOT spec; the 16-bit ones compile
    without spills on sm_80 and sm_90 (tests/test_sass.py checks the instruction mix)."""
    widest = max(block_dqk, block_dv)
    if dtype == torch.float32:  # tf32x3 dots: fp32-accurate on tensor cores, twice the bytes per tile
        if widest <= 64:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        if widest <= 128:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if widest <= 64:  # two warpgroups of 64 rows (4 warps hold too many registers with 3 stages)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if widest <= 128:  # 32-key tiles, 3 stages: the varlen variant spills at 64 keys on sm_80
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if block_dv <= 128 else 8, num_stages=2)


def decode_config(rows: int, block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """Decode tiles: one row tile holding all groups x Sq rows of a kv head (16, or 64 for MQA-like head
    counts such as DeepSeek's), wide key blocks to stream K/V; 8 warps where the tile is wide, and for every
    64-row 16-bit tile (4 warps with 3 stages spill on sm_80 at head dim 64)."""
    block_m = DECODE_ROW_TILES[0] if rows <= DECODE_ROW_TILES[0] else DECODE_ROW_TILES[1]
    widest = max(block_dqk, block_dv)
    wide = widest > 64 if dtype == torch.float32 else block_m > 16
    block_n = 32 if dtype == torch.float32 or widest > 128 else 64
    stages = 1 if dtype == torch.float32 else (2 if widest > 128 else 3)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if wide else 4, num_stages=stages)


DECODE_ROW_TILES = (16, 64)  # groups x Sq up to 64 (with Sq <= Sk) takes the split-K path


def decode_row_tiles(dtype: torch.dtype) -> tuple[int, ...]:
    """fp32 keeps to the 16-row tile (64 fp32 rows spill); more rows go to the prefill kernel."""
    return DECODE_ROW_TILES[:1] if dtype == torch.float32 else DECODE_ROW_TILES
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


def _num_splits(keys: int, programs: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, each with >= MIN_KEYS_PER_SPLIT keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, (2 * sms) // max(1, programs))
    most = max(1, keys // MIN_KEYS_PER_SPLIT)
    return int(min(want, most, MAX_SPLITS))


def check_head_dims(dim_qk: int, dim_v: int) -> None:
    if dim_qk > MAX_HEAD_DIM or dim_v > MAX_HEAD_DIM:
        raise ValueError(
            f"dsattn.sliding_window_attention: the Triton kernels support head dims up to {MAX_HEAD_DIM} "
            f"(got q/k {dim_qk}, v {dim_v}); use backend='torch' for wider heads (e.g. MLA 576/512)"
        )


# ----------------------------------------------------------------------------------------- launchers
def _fwd(q, k, v, out, sinks, cu_q, cu_k, strides, shape, window, causal, scale, lse=None):
    """strides: (q, k, v, out) each (b, h, s, d); shape: (batch, HQ, groups, SEQ_Q, SEQ_K, max_seqlen_q).
    lse: a contiguous fp32 [B, HQ, SEQ_Q] to write the rows' base-2 log-sum-exp into (the backward's)."""
    batch, hq, groups, seq_q, seq_k, max_q = shape
    dqk, dv = q.shape[-1], v.shape[-1]
    block_dqk, block_dv = _pow2(dqk), _pow2(dv)
    cfg = fwd_config(block_dqk, block_dv, q.dtype)
    grid = (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * hq)
    launch(sliding_window_attention_fwd_kernel)[grid](
        q, k, v, out, lse, sinks, cu_q, cu_k, *strides[0], *strides[1], *strides[2], *strides[3],
        hq, groups, seq_q, seq_k, dqk, dv, window, scale * LOG2E,
        CAUSAL=causal, HAS_SINKS=sinks is not None, IS_VARLEN=cu_q is not None, WRITE_LSE=lse is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, TF32X3=q.dtype == torch.float32,
        LONG_OFFSETS=long_offsets(q, k, v, out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _decode(q, k, v, out, sinks, window, causal, scale):
    batch, hq, seq_q, dqk = q.shape
    hkv, seq_k, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    block_dqk, block_dv = _pow2(dqk), _pow2(dv)
    cfg = decode_config(groups * seq_q, block_dqk, block_dv, q.dtype)
    # Every row's window lies in [key_lo, seq_k): rows sit at the end of the cache.
    key_lo = max(0, seq_k - seq_q - window + 1)
    keys = seq_k - key_lo
    num_splits = _num_splits(keys, batch * hkv, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(keys, num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    num_splits = triton.cdiv(keys, keys_per_split)
    o_part = torch.empty(batch, hq, seq_q, num_splits, block_dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, hq, seq_q, num_splits, dtype=torch.float32, device=q.device)
    launch(sliding_window_attention_decode_split_kernel)[(num_splits, batch * hkv)](
        q, k, v, o_part, lse_part, *q.stride(), *k.stride(), *v.stride(),
        hkv, groups, seq_q, seq_k, dqk, dv, window, scale * LOG2E, key_lo, keys_per_split, num_splits,
        CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, TF32X3=q.dtype == torch.float32,
        LONG_OFFSETS=long_offsets(q, k, v, out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    launch(sliding_window_attention_decode_combine_kernel)[(batch * hq * seq_q,)](
        o_part, lse_part, out, sinks, *out.stride(), hq, seq_q, dv, num_splits,
        HAS_SINKS=sinks is not None, BLOCK_SPLITS=MAX_SPLITS, BLOCK_DV=block_dv,
        num_warps=4 if block_dv >= 128 else 2,
    )
    return out


def sliding_window_attention(q, k, v, window, causal, scale, sinks, out=None):
    """q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] (validated, any strides) -> [B, Hq, Sq, Dv].
    out: optional [B, Hq, Sq, Dv] buffer (any strides) the kernels write every element of."""
    batch, hq, seq_q, dqk = q.shape
    hkv, seq_k, dv = k.shape[1], k.shape[2], v.shape[3]
    check_head_dims(dqk, dv)
    if out is None:
        out = torch.empty(batch, hq, seq_q, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if seq_k == 0:
        return out.zero_()
    window = min(window, seq_k + seq_q)  # keeps int32 arithmetic in range; larger windows see the same keys
    if (hq // hkv) * seq_q <= decode_row_tiles(q.dtype)[-1] and seq_q <= seq_k:
        return _decode(q, k, v, out, sinks, window, causal, scale)
    strides = (q.stride(), k.stride(), v.stride(), out.stride())
    return _fwd(q, k, v, out, sinks, None, None, strides, (batch, hq, hq // hkv, seq_q, seq_k, seq_q),
                window, causal, scale)


def sliding_window_attention_fwd_lse(q, k, v, window, causal, scale, sinks):
    """The forward for training: (out, lse), lse the rows' base-2 log-sum-exp (fp32 [B, Hq, Sq], sink
    included, +inf for an empty row). Always the prefill kernel (decode's split-K has no lse to save)."""
    batch, hq, seq_q, dqk = q.shape
    hkv, seq_k, dv = k.shape[1], k.shape[2], v.shape[3]
    check_head_dims(dqk, dv)
    out = torch.empty(batch, hq, seq_q, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, seq_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    if seq_k == 0:
        return out.zero_(), lse.fill_(float("inf")) if sinks is None else lse.copy_(
            (sinks.float() * LOG2E)[None, :, None].expand_as(lse))
    window = min(window, seq_k + seq_q)
    strides = (q.stride(), k.stride(), v.stride(), out.stride())
    _fwd(q, k, v, out, sinks, None, None, strides, (batch, hq, hq // hkv, seq_q, seq_k, seq_q),
         window, causal, scale, lse=lse)
    return out, lse


def bwd_config(kernel: str, block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """Backward tiles. dK/dV holds k, v and their fp32 gradients for a key block (narrow row tiles stream the
    queries); dQ holds q, dO and dq for a row block (narrow key tiles). Wide heads and fp32 take smaller
    tiles so that the accumulators stay in registers."""
    widest = max(block_dqk, block_dv)
    if kernel == "dkdv":
        if dtype == torch.float32:
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
        if widest <= 128:  # 16-row query tiles: two pipelined stages without spills on sm_80
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if widest <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if widest <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1)


def preprocess_block_m(block_dv: int) -> int:
    """Rows per preprocess program: two [rows, Dv] tiles in registers (d256 at 64 rows spills)."""
    return 64 if block_dv <= 128 else 32


def _bwd(grad_out, q, k, v, out, lse, grads, cu_q, cu_k, strides, shape, window, causal, scale):
    """The three backward kernels into grads = (dq, dk, dv). strides: (q, k, v, grad_out, out, dq, dk, dv) each
    (b, h, s, d); shape: (batch, HQ, HKV, SEQ_Q, SEQ_K, max_seqlen_q, max_seqlen_k), for varlen batch = the
    sequences and SEQ_Q / SEQ_K the packed token counts. Returns delta = rowsum(dO O), fp32 laid out as lse."""
    batch, hq, hkv, seq_q, seq_k, max_q, max_k = shape
    dq, dk, dv_ = grads
    dqk, dv = q.shape[-1], v.shape[-1]
    groups = hq // hkv
    varlen = cu_q is not None
    block_dqk, block_dv = _pow2(dqk), _pow2(dv)
    upcast = interpreting() and q.dtype == torch.bfloat16
    tf32x3 = q.dtype == torch.float32
    # delta is per (head, row) whatever the layout: varlen's packed tokens are one long padded sequence here.
    pre_batch = 1 if varlen else batch
    delta = torch.empty(*((hq,) if varlen else (batch, hq)), seq_q, dtype=torch.float32, device=q.device)
    pre_m = preprocess_block_m(block_dv)
    launch(sliding_window_attention_bwd_preprocess_kernel)[(triton.cdiv(seq_q, pre_m), pre_batch * hq)](
        out, grad_out, delta, *strides[4], *strides[3], hq, seq_q, dv,
        BLOCK_M=pre_m, BLOCK_DV=block_dv, num_warps=4,
    )
    cfg = bwd_config("dkdv", block_dqk, block_dv, q.dtype)
    launch(sliding_window_attention_bwd_dkdv_kernel)[(triton.cdiv(max_k, cfg["BLOCK_N"]), batch * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv_, cu_q, cu_k, *strides[0], *strides[1], *strides[2], *strides[3],
        *strides[6], *strides[7], hkv, groups, seq_q, seq_k, dqk, dv, window, scale, scale * LOG2E,
        CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        UPCAST=upcast, TF32X3=tf32x3, IS_VARLEN=varlen, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    cfg = bwd_config("dq", block_dqk, block_dv, q.dtype)
    launch(sliding_window_attention_bwd_dq_kernel)[(triton.cdiv(max_q, cfg["BLOCK_M"]), batch * hq)](
        q, k, v, grad_out, lse, delta, dq, cu_q, cu_k, *strides[0], *strides[1], *strides[2], *strides[3],
        *strides[5], hq, groups, seq_q, seq_k, dqk, dv, window, scale, scale * LOG2E,
        CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        UPCAST=upcast, TF32X3=tf32x3, IS_VARLEN=varlen, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return delta


def _dsinks(sinks, lse, delta, head_dim):
    """dsinks[h] = -sum over h's rows of 2^(log2(e) sink_h - lse) delta (fp32 torch reduction)."""
    if sinks is None:
        return None
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    p_sink = torch.exp2(sinks.float().view(shape) * LOG2E - lse)
    return -(p_sink * delta).sum([d for d in range(lse.dim()) if d != head_dim]).to(sinks.dtype)


def sliding_window_attention_backward(grad_out, q, k, v, out, lse, window, causal, scale, sinks):
    """(dq, dk, dv, dsinks) from the forward's out and base-2 lse (sliding_window_attention_fwd_lse); dsinks
    None without sinks."""
    batch, hq, seq_q, dqk = q.shape
    hkv, seq_k, dv = k.shape[1], k.shape[2], v.shape[3]
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    delta = torch.zeros(batch, hq, seq_q, dtype=torch.float32, device=q.device)
    if grad_out.numel() and seq_k:
        window = min(window, seq_k + seq_q)
        strides = tuple(t.stride() for t in (q, k, v, grad_out, out, *grads))
        delta = _bwd(grad_out, q, k, v, out, lse, grads, None, None, strides,
                     (batch, hq, hkv, seq_q, seq_k, seq_q, seq_k), window, causal, scale)
    return (*grads, _dsinks(sinks, lse, delta, 1))


def sliding_window_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal, scale, sinks, out=None, lse=None
):
    """q [total_q, Hq, Dqk], k [total_k, Hkv, Dqk], v [total_k, Hkv, Dv], cu_seqlens int32 [n + 1].
    lse: a contiguous fp32 [Hq, total_q] to write the rows' base-2 log-sum-exp into (the training forward)."""
    total_q, hq, dqk = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    check_head_dims(dqk, dv)
    if out is None:
        out = torch.empty(total_q, hq, dv, dtype=q.dtype, device=q.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out.numel() == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    window = min(window, 2**30)
    # Token-major [T, H, D]: the batch stride is 0 and the token stride is the sequence stride.
    strides = tuple((0, t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, v, out))
    return _fwd(q, k, v, out, sinks, cu_seqlens_q, cu_seqlens_k, strides,
                (num_seqs, hq, hq // hkv, 0 if lse is None else total_q, 0, max_seqlen_q), window, causal, scale,
                lse=lse)


def sliding_window_attention_varlen_fwd_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal,
                                            scale, sinks):
    """The varlen forward for training: (out, lse), lse fp32 [Hq, total_q] (base 2, as the padded one's)."""
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    out = sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, window, causal,
                                          scale, sinks, lse=lse)
    return out, lse


def sliding_window_attention_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, window, causal, scale, sinks):
    """(dq, dk, dv, dsinks) of the varlen op from its out and lse (sliding_window_attention_varlen_fwd_lse):
    the padded kernels with each sequence's bounds read from cu_seqlens, over the packed tensors in place."""
    total_q, hq, dqk = q.shape
    total_k, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    delta = torch.zeros(hq, total_q, dtype=torch.float32, device=q.device)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if grad_out.numel() and total_k and num_seqs and max_seqlen_q and max_seqlen_k:
        window = min(window, max_seqlen_q + max_seqlen_k)
        strides = tuple((0, t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, v, grad_out, out, *grads))
        delta = _bwd(grad_out, q, k, v, out, lse, grads, cu_seqlens_q, cu_seqlens_k, strides,
                     (num_seqs, hq, hkv, total_q, total_k, max_seqlen_q, max_seqlen_k), window, causal, scale)
    return (*grads, _dsinks(sinks, lse, delta, 0))


# ----------------------------------------------------------------------------------------- AOT
# Head-dim buckets the heuristics distinguish, compiled at their widest (64, 128, MLA 192/128, 256).
# fp32 configs are not hot (hot=False: may spill): fp32 dots run as tf32x3 (three tensor-core passes for
# fp32 accuracy), whose split operands do not fit the registers at these tiles; 16-bit is the fast path.
HEAD_DIM_BUCKETS = ((64, 64), (128, 128), (256, 128), (256, 256))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _strides(prefix: str, names=("b", "h", "s")) -> dict:
    return {f"stride_{prefix}{n}": "i32" for n in names}


# The JIT specializes an int argument equal to 1 into a constant: a contiguous head dim (the hot path, and
# what transformers passes) compiles with stride_*d == 1, which lets the loads vectorize.
def _unit_head_strides(*prefixes) -> dict:
    return {f"stride_{p}d": 1 for p in prefixes}


def _aligned(signature: dict) -> tuple[str, ...]:
    """Pointers, strides and the head dims: multiples of 16 for the usual head dims, as the JIT sees them on the
    hot path (it specializes every integer argument divisible by 16). The head dims matter most: with them the
    head-dim masks are uniform over 16 elements, so tile loads vectorize and become cp.async (pipelined)."""
    return tuple(n for n, t in signature.items() if t.startswith("*") or n.startswith("stride_") or n in ("DQK", "DV"))


def _bwd_specs(dtype, p, tag, block_dqk, block_dv) -> list[AOTSpec]:
    """The training forward (WRITE_LSE) and the backward kernels at the bucket's tiles."""
    specs = []
    fcfg = fwd_config(block_dqk, block_dv, dtype)
    signature = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "lse_ptr": "*fp32", "sinks_ptr": "*fp32",
                 "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32",
                 **_strides("q"), **_strides("k"), **_strides("v"), **_strides("o"),
                 "HQ": "i32", "GROUPS": "i32", "SEQ_Q": "i32", "SEQ_K": "i32", "DQK": "i32",
                 "DV": "i32", "window": "i32", "qk_scale_log2": "fp32"}
    specs.append(AOTSpec(
        name=f"fwd_lse_{tag}", kernel=sliding_window_attention_fwd_kernel, signature=signature,
        constexprs=dict(**_unit_head_strides("q", "k", "v", "o"), CAUSAL=True, HAS_SINKS=True, IS_VARLEN=False,
                        BLOCK_M=fcfg["BLOCK_M"], BLOCK_N=fcfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
                        UPCAST=False, TF32X3=dtype == torch.float32, LONG_OFFSETS=False, WRITE_LSE=True),
        num_warps=fcfg["num_warps"], num_stages=fcfg["num_stages"], divisible_by_16=_aligned(signature),
        hot=dtype != torch.float32,
    ))
    signature = {"o_ptr": p, "do_ptr": p, "delta_ptr": "*fp32", **_strides("o"), **_strides("do"),
                 "HQ": "i32", "SEQ_Q": "i32", "DV": "i32"}
    specs.append(AOTSpec(
        name=f"bwd_preprocess_{tag}", kernel=sliding_window_attention_bwd_preprocess_kernel, signature=signature,
        constexprs=dict(**_unit_head_strides("o", "do"), BLOCK_M=preprocess_block_m(block_dv), BLOCK_DV=block_dv),
        num_warps=4, num_stages=1, divisible_by_16=_aligned(signature), hot=dtype != torch.float32,
    ))
    for kind, kernel in (("dkdv", sliding_window_attention_bwd_dkdv_kernel), ("dq", sliding_window_attention_bwd_dq_kernel)):
        cfg = bwd_config(kind, block_dqk, block_dv, dtype)
        grads = ("dk", "dv") if kind == "dkdv" else ("dq",)
        signature = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                     **{f"{g}_ptr": p for g in grads}, "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32",
                     **_strides("q"), **_strides("k"), **_strides("v"), **_strides("do"),
                     **{k_: v_ for g in grads for k_, v_ in _strides(g).items()},
                     "HKV" if kind == "dkdv" else "HQ": "i32", "GROUPS": "i32", "SEQ_Q": "i32", "SEQ_K": "i32",
                     "DQK": "i32", "DV": "i32", "window": "i32", "qk_scale": "fp32", "qk_scale_log2": "fp32"}
        specs.append(AOTSpec(
            name=f"bwd_{kind}_{tag}", kernel=kernel, signature=signature,
            constexprs=dict(**_unit_head_strides("q", "k", "v", "do", *grads), CAUSAL=True, BLOCK_M=cfg["BLOCK_M"],
                            BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, UPCAST=False,
                            TF32X3=dtype == torch.float32, IS_VARLEN=False),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=_aligned(signature),
            hot=dtype != torch.float32,
        ))
    if dtype != torch.float32 and block_dqk == block_dv and block_dqk <= 128:
        # Varlen training (packed sequences) at the common head dims, 16-bit: the same kernels, IS_VARLEN.
        specs += [dataclasses.replace(spec, name=spec.name.replace(f"_{tag}", f"_varlen_{tag}"),
                                      constexprs={**spec.constexprs, "IS_VARLEN": True})
                  for spec in list(specs) if "IS_VARLEN" in spec.constexprs]
    return specs


def aot_specs() -> list[AOTSpec]:
    specs = []
    for dtype in DTYPES:
        p = ptr(dtype)
        for block_dqk, block_dv in HEAD_DIM_BUCKETS:
            tag = f"{str(dtype).replace('torch.', '')}_d{block_dqk}x{block_dv}"
            cfg = fwd_config(block_dqk, block_dv, dtype)
            for varlen in (False, True):
                signature = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "lse_ptr": "*fp32", "sinks_ptr": "*fp32",
                             "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32",
                             **_strides("q"), **_strides("k"), **_strides("v"), **_strides("o"),
                             "HQ": "i32", "GROUPS": "i32", "SEQ_Q": "i32", "SEQ_K": "i32", "DQK": "i32",
                             "DV": "i32", "window": "i32", "qk_scale_log2": "fp32"}
                specs.append(AOTSpec(
                    name=f"fwd{'_varlen' if varlen else ''}_{tag}", kernel=sliding_window_attention_fwd_kernel, signature=signature,
                    constexprs=dict(**_unit_head_strides("q", "k", "v", "o"), CAUSAL=True, HAS_SINKS=True,
                                    IS_VARLEN=varlen, BLOCK_M=cfg["BLOCK_M"],
                                    BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
                                    UPCAST=False, TF32X3=dtype == torch.float32, LONG_OFFSETS=False,
                                    WRITE_LSE=False),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=_aligned(signature),
                    hot=dtype != torch.float32,
                ))
            specs += _bwd_specs(dtype, p, tag, block_dqk, block_dv)
            for rows in decode_row_tiles(dtype):
                cfg = decode_config(rows, block_dqk, block_dv, dtype)
                signature = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
                             **_strides("q"), **_strides("k"), **_strides("v"),
                             "HKV": "i32", "GROUPS": "i32", "SEQ_Q": "i32", "SEQ_K": "i32", "DQK": "i32",
                             "DV": "i32", "window": "i32", "qk_scale_log2": "fp32", "key_lo": "i32",
                             "keys_per_split": "i32", "NUM_SPLITS": "i32"}
                specs.append(AOTSpec(
                    name=f"decode_split_m{rows}_{tag}", kernel=sliding_window_attention_decode_split_kernel, signature=signature,
                    constexprs=dict(**_unit_head_strides("q", "k", "v"), CAUSAL=True, BLOCK_M=cfg["BLOCK_M"],
                                    BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, UPCAST=False,
                                    TF32X3=dtype == torch.float32, LONG_OFFSETS=False),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=_aligned(signature),
                    hot=dtype != torch.float32,
                ))
        for block_dv in sorted({dv for _, dv in HEAD_DIM_BUCKETS}):
            signature = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "o_ptr": p, "sinks_ptr": "*fp32",
                         **_strides("o"), "HQ": "i32", "SEQ_Q": "i32", "DV": "i32", "NUM_SPLITS": "i32"}
            specs.append(AOTSpec(
                name=f"decode_combine_{str(dtype).replace('torch.', '')}_dv{block_dv}",
                kernel=sliding_window_attention_decode_combine_kernel, signature=signature, divisible_by_16=_aligned(signature),
                constexprs=dict(**_unit_head_strides("o"), HAS_SINKS=True, BLOCK_SPLITS=MAX_SPLITS, BLOCK_DV=block_dv),
                num_warps=4 if block_dv >= 128 else 2, num_stages=1,
            ))
    # The 64-bit variant compiles too (a rare path: not held to the no-spill rule).
    specs += [dataclasses.replace(spec, name=spec.name + "_long", hot=False,
                                  constexprs={**spec.constexprs, "LONG_OFFSETS": True})
              for spec in list(specs) if spec.name.endswith("bfloat16_d128x128") and "LONG_OFFSETS" in spec.constexprs]
    return specs
