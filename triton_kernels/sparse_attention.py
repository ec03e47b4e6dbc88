"""Index-driven sparse attention (DeepSeek-V3.2 DSA) in Triton.

One program owns one query row, one KV head, a block of that KV head's q heads (BLOCK_H of the GQA group)
and a BLOCK_DV slice of the output. It walks the row's topk list BLOCK_N entries at a time, gathers each
listed K/V row once and uses it for every q head of the block (indices are shared by the group, as in
FlashMLA's sparse kernels), and runs an fp32 online softmax. Entries that are -1, out of [0, Sk) or (causal)
after the query's position are masked: their loads never touch memory and they get no weight.

Dqk is walked in BLOCK_DK chunks (any Dqk: 128, 192, 576 ...); Dv is split over programs in slices of up to
256 (each slice recomputes the scores: the price of keeping the accumulator in registers; MLA's Dv=512 takes
two slices). Sizes are not limited beyond that: batch, head and row bases are 64-bit; offsets within one
(batch, kv head) slice of k/v (key x row stride) and one query row's GQA group of q (head x head stride) are
int32 unless they can pass 2^31 (LONG_OFFSETS, set by the launcher from shapes and strides; the usual shapes
keep int32 offsets, whose gathered pointer tiles hold half the registers).

Decode (few programs, long topk): the topk list is split over NUM_SPLITS programs, each writing a
normalized fp32 partial output plus its log-sum-exp; `sparse_attention_combine_kernel` merges them. This is
flash-decoding's split-K, so one sequence fills the GPU.

Training: the forward with WRITE_LSE (one split) also saves each row's base-2 log-sum-exp, and
`sparse_attention_bwd_kernel` (FlashAttention-2 style, on the forward's grid) recomputes p over the listed
keys from it, writes dq and adds dk/dv into fp32 buffers with atomics.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, TRITON_DTYPE, interpreting, launch, long_offsets, ptr
from .sliding_window_attention import _dot

BLOCK_N = 32  # gathered K/V rows per step
BLOCK_DK = 64  # Dqk chunk per tl.dot
BLOCK_HS = (16, 32, 64)  # q heads per program (tl.dot needs >= 16 rows; smaller groups are masked)
BLOCK_DVS = (64, 128, 256)
MAX_SPLITS = 64  # decode split-K fan-out (also the combine kernel's tile)
COMBINE_BLOCK_DV = 128
BWD_MAX_SLICE = 128  # dq/dk and dv columns per backward program
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


@triton.jit
def _listed_keys(idx_row, offs_t, stride_it, t_stop, SK, last_key, LONG_OFFSETS: tl.constexpr):
    """(key, valid) of topk entries offs_t of one row's list: -1, out of [0, SK), after last_key (causal) or past
    t_stop are invalid and read key 0 (their loads are masked; they get no weight)."""
    key = tl.load(idx_row + offs_t * stride_it, mask=offs_t < t_stop, other=-1)
    valid = (key >= 0) & (key < SK) & (key <= last_key)
    key = tl.where(valid, key, 0)
    if LONG_OFFSETS:  # key x the row stride can pass 2^31
        key = key.to(tl.int64)
    return key, valid


@triton.jit
def _listed_scores(q_base, offs_gq, stride_qh, stride_qd, head_mask, k_base, key, valid, stride_kn, stride_kd,
                   offs_dk, DQK, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                   UPCAST: tl.constexpr, TF32X3: tl.constexpr):
    """q . k of the block's heads and gathered keys [BLOCK_H, BLOCK_N] (unscaled), Dqk in BLOCK_DK chunks."""
    scores = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, DQK, BLOCK_DK):
        d = d0 + offs_dk
        d_mask = d < DQK
        q_chunk = tl.load(q_base + offs_gq[:, None] * stride_qh + d[None, :] * stride_qd,
                          mask=head_mask[:, None] & d_mask[None, :], other=0.0)
        k_chunk = tl.load(k_base + key[None, :] * stride_kn + d[:, None] * stride_kd,
                          mask=valid[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_DK, BLOCK_N]
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong
            q_chunk = q_chunk.to(tl.float32)
            k_chunk = k_chunk.to(tl.float32)
        scores = _dot(q_chunk, k_chunk, scores, TF32X3)
    return scores


@triton.jit
def sparse_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_it,
    HKV, GROUPS, SQ, SK, TOPK, DQK, DV,
    HEAD_BLOCKS, DV_BLOCKS, NUM_SPLITS, TOPK_PER_SPLIT,
    scale_log2, last_key_shift,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, LONG_OFFSETS: tl.constexpr, WRITE_LSE: tl.constexpr = False,
    TF32X3: tl.constexpr = False,
):
    pid_row = tl.program_id(0)  # query row x split
    pid_head = tl.program_id(1)  # batch x kv head x head block x dv block
    m = pid_row // NUM_SPLITS
    split = pid_row % NUM_SPLITS
    dv_block = pid_head % DV_BLOCKS
    rest = pid_head // DV_BLOCKS
    head_block = rest % HEAD_BLOCKS
    rest = rest // HEAD_BLOCKS
    hkv = rest % HKV
    b = rest // HKV

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # q heads of this block, within the group
    head_mask = offs_g < GROUPS
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)

    # 64-bit scalar bases, 32-bit offsets within one (batch, head) slice unless LONG_OFFSETS: the gathered
    # pointer tiles then cost half the registers.
    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + m.to(tl.int64) * stride_qm + (hkv64 * GROUPS) * stride_qh
    k_base = k_ptr + b64 * stride_kb + hkv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hkv64 * stride_vh
    if LONG_OFFSETS:  # head x the head stride can pass 2^31 within a GQA group
        offs_gq = offs_g.to(tl.int64)
    else:
        offs_gq = offs_g
    idx_row = idx_ptr + b64 * stride_ib + hkv64 * stride_ih + m.to(tl.int64) * stride_im
    last_key = m + last_key_shift  # query position i + Sk - Sq when causal, else past every key

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    t_start = split * TOPK_PER_SPLIT
    t_stop = tl.minimum(t_start + TOPK_PER_SPLIT, TOPK)
    for t0 in range(t_start, t_stop, BLOCK_N):
        key, valid = _listed_keys(idx_row, t0 + offs_n, stride_it, t_stop, SK, last_key, LONG_OFFSETS)
        scores = _listed_scores(q_base, offs_gq, stride_qh, stride_qd, head_mask, k_base, key, valid, stride_kn,
                                stride_kd, offs_dk, DQK, BLOCK_H, BLOCK_N, BLOCK_DK, UPCAST, TF32X3)
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet stays at zero weight
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_chunk = tl.load(v_base + key[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                          mask=valid[:, None] & dv_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        if UPCAST:
            pv = tl.dot(p, v_chunk.to(tl.float32), out_dtype=tl.float32)
        elif TF32X3:  # fp32 training: fp32-accurate on tensor cores (the backward recomputes p from this lse)
            pv = _dot(p, v_chunk, tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32), True)
        else:
            pv = tl.dot(p.to(v_chunk.dtype), v_chunk, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_key = l_i > 0
    o = acc * (1.0 / tl.where(has_key, l_i, 1.0))[:, None]  # no valid key: 0 * 1 = 0; one divide per row
    # Output (and split workspace) rows are contiguous: ((b*Hq + hq) * Sq + m) * NUM_SPLITS + split.
    out_rows = ((b64 * HKV * GROUPS + hkv64 * GROUPS + offs_g) * SQ + m) * NUM_SPLITS + split  # [BLOCK_H]
    store_mask = head_mask[:, None] & dv_mask[None, :]
    if SPLIT:
        tl.store(out_ptr + out_rows[:, None] * DV + offs_dv[None, :], o, mask=store_mask)
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))  # base 2
        tl.store(lse_ptr + out_rows, lse, mask=head_mask)  # every Dv slice writes the same value
    else:
        tl.store(out_ptr + out_rows[:, None] * DV + offs_dv[None, :], o.to(out_ptr.dtype.element_ty), mask=store_mask)
        if WRITE_LSE:  # training: the backward recomputes p from it (-inf: a row with no valid key)
            lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))  # base 2
            tl.store(lse_ptr + out_rows, lse, mask=head_mask)


@triton.jit
def sparse_attention_combine_kernel(
    part_ptr, lse_ptr, out_ptr, NUM_SPLITS, DV,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge NUM_SPLITS normalized partial outputs of one row by their base-2 log-sum-exps."""
    row = tl.program_id(0).to(tl.int64)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # empty splits weigh 0
    total = tl.sum(weight, 0)
    part = tl.load(part_ptr + (row * NUM_SPLITS + offs_s)[:, None] * DV + offs_dv[None, :],
                   mask=s_mask[:, None] & (offs_dv[None, :] < DV), other=0.0)
    o = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * DV + offs_dv, o.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


# ------------------------------------------------------------------------------------------- backward
# FlashAttention-2 style, from the forward's base-2 log-sum-exp: p = 2^(scale log2(e) s - lse) recomputed
# over the listed keys, dS = p (dP - delta), delta = rowsum(dO O). One program per (query row, kv head,
# block of the group's q heads, output slice), the forward's grid: it gathers each listed K/V row once for
# all its heads, writes its dq slice directly and adds its dk/dv slices into fp32 buffers with atomics
# (keys are listed by many rows and programs; as in the sparse MLA backwards of FlashMLA / TileLang).
# delta is computed in the program from the row's O and dO (no preprocess kernel, no buffer). A duplicate
# listing is its own column: its gradient is added once per listing, as the forward counts it.
@triton.jit
def sparse_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_im, stride_it,
    stride_dob, stride_doh, stride_dom, stride_dod,
    HKV, GROUPS, SQ, SK, TOPK, DQK, DV,
    HEAD_BLOCKS, SLICES, DQ_SLICES, DV_SLICES,
    scale, scale_log2, last_key_shift,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, LONG_OFFSETS: tl.constexpr, TF32X3: tl.constexpr,
):
    """o, lse, dq: contiguous [B, Hq, Sq, Dv] / [B, Hq, Sq] (base 2) / [B, Hq, Sq, Dqk]; dk, dv: contiguous
    fp32 [B, Hkv, Sk, D], zeroed. Slice j of a program: dq and dk columns [j BLOCK_DQ, (j + 1) BLOCK_DQ) when
    j < DQ_SLICES, dv columns [j BLOCK_DV, (j + 1) BLOCK_DV) when j < DV_SLICES; the scores (all of Dqk)
    and dP (all of Dv) are walked in BLOCK_DK chunks, so any head dims work."""
    m = tl.program_id(0)
    pid_head = tl.program_id(1)  # batch x kv head x head block x slice
    slice_ = pid_head % SLICES
    rest = pid_head // SLICES
    head_block = rest % HEAD_BLOCKS
    rest = rest // HEAD_BLOCKS
    hkv = rest % HKV
    b = rest // HKV

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = offs_g < GROUPS
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dq = slice_ * BLOCK_DQ + tl.arange(0, BLOCK_DQ)
    dq_mask = offs_dq < DQK
    offs_dv = slice_ * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    do_dq = slice_ < DQ_SLICES
    do_dv = slice_ < DV_SLICES

    b64 = b.to(tl.int64)
    hkv64 = hkv.to(tl.int64)
    m64 = m.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + m64 * stride_qm + (hkv64 * GROUPS) * stride_qh
    do_base = do_ptr + b64 * stride_dob + m64 * stride_dom + (hkv64 * GROUPS) * stride_doh
    k_base = k_ptr + b64 * stride_kb + hkv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + hkv64 * stride_vh
    dk_base = dk_ptr + (b64 * HKV + hkv64) * SK * DQK
    dv_base = dv_ptr + (b64 * HKV + hkv64) * SK * DV
    if LONG_OFFSETS:  # head x the head stride can pass 2^31 within a GQA group
        offs_gq = offs_g.to(tl.int64)
    else:
        offs_gq = offs_g
    rows = (b64 * HKV * GROUPS + hkv64 * GROUPS + offs_g) * SQ + m  # [BLOCK_H] rows of o, lse, dq
    idx_row = idx_ptr + b64 * stride_ib + hkv64 * stride_ih + m64 * stride_im
    last_key = m + last_key_shift

    # Padded heads: lse = +inf, so p = 0 there.
    lse = tl.load(lse_ptr + rows, mask=head_mask, other=float("inf"))
    delta = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d0 in range(0, DV, BLOCK_DK):
        d = d0 + offs_dk
        mask = head_mask[:, None] & (d[None, :] < DV)
        o_chunk = tl.load(o_ptr + rows[:, None] * DV + d[None, :], mask=mask, other=0.0)
        do_chunk = tl.load(do_base + offs_gq[:, None] * stride_doh + d[None, :] * stride_dod, mask=mask, other=0.0)
        delta += tl.sum(o_chunk.to(tl.float32) * do_chunk.to(tl.float32), 1)

    q_slice = tl.load(q_base + offs_gq[:, None] * stride_qh + offs_dq[None, :] * stride_qd,
                      mask=head_mask[:, None] & dq_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_DQ]
    do_slice = tl.load(do_base + offs_gq[:, None] * stride_doh + offs_dv[None, :] * stride_dod,
                       mask=head_mask[:, None] & dv_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_DV]
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong
        q_slice = q_slice.to(tl.float32)
        do_slice = do_slice.to(tl.float32)
    dq = tl.zeros([BLOCK_H, BLOCK_DQ], dtype=tl.float32)
    for t0 in range(0, TOPK, BLOCK_N):
        key, valid = _listed_keys(idx_row, t0 + offs_n, stride_it, TOPK, SK, last_key, LONG_OFFSETS)
        scores = _listed_scores(q_base, offs_gq, stride_qh, stride_qd, head_mask, k_base, key, valid, stride_kn,
                                stride_kd, offs_dk, DQK, BLOCK_H, BLOCK_N, BLOCK_DK, UPCAST, TF32X3)
        # Masked by where (not by multiplying): an unlisted or future key never enters a row's arithmetic.
        p = tl.where(valid[None, :], tl.exp2(scores * scale_log2 - lse[:, None]), 0.0)

        if do_dv:
            dv_tile = _dot(tl.trans(p.to(do_slice.dtype)), do_slice, tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32),
                           TF32X3)
            tl.atomic_add(dv_base + key[:, None] * DV + offs_dv[None, :], dv_tile,
                          mask=valid[:, None] & dv_mask[None, :], sem="relaxed")
        if do_dq:
            dp = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, DV, BLOCK_DK):
                d = d0 + offs_dk
                d_mask = d < DV
                do_chunk = tl.load(do_base + offs_gq[:, None] * stride_doh + d[None, :] * stride_dod,
                                   mask=head_mask[:, None] & d_mask[None, :], other=0.0)
                v_chunk = tl.load(v_base + key[None, :] * stride_vn + d[:, None] * stride_vd,
                                  mask=valid[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_DK, BLOCK_N]
                if UPCAST:
                    do_chunk = do_chunk.to(tl.float32)
                    v_chunk = v_chunk.to(tl.float32)
                dp = _dot(do_chunk, v_chunk, dp, TF32X3)
            ds = tl.where(valid[None, :], p * (dp - delta[:, None]), 0.0) * scale  # d(loss)/d(q.k)
            k_slice = tl.load(k_base + key[:, None] * stride_kn + offs_dq[None, :] * stride_kd,
                              mask=valid[:, None] & dq_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_DQ]
            if UPCAST:
                k_slice = k_slice.to(tl.float32)
            dq = _dot(ds.to(k_slice.dtype), k_slice, dq, TF32X3)
            dk_tile = _dot(tl.trans(ds.to(q_slice.dtype)), q_slice, tl.zeros([BLOCK_N, BLOCK_DQ], dtype=tl.float32),
                           TF32X3)
            tl.atomic_add(dk_base + key[:, None] * DQK + offs_dq[None, :], dk_tile,
                          mask=valid[:, None] & dq_mask[None, :], sem="relaxed")
    if do_dq:
        tl.store(dq_ptr + rows[:, None] * DQK + offs_dq[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=head_mask[:, None] & dq_mask[None, :])


# ------------------------------------------------------------------------------------------- launcher
def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def block_config(groups: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_DV, num_warps, num_stages): the whole GQA group in one program up to 64 q heads (more
    go to further head blocks), Dv in slices of up to 256 (MLA's 512: two slices, each gathers K and
    recomputes the scores once more; a 512-wide fp32 accumulator needs 16 warps, which spill on sm_80).
    Warps and stages as measured with the AOT compile (no stack frame on sm_80/sm_90): 4 warps for 16-head
    tiles, 8 above; the 32 x 256 tile leaves a stack frame on sm_90 when pipelined, so it runs one stage."""
    block_h = min(max(_next_pow2(groups), BLOCK_HS[0]), BLOCK_HS[-1])
    block_dv = next((size for size in BLOCK_DVS if dv <= size), BLOCK_DVS[-1])
    # 16 x 256 with 4 warps leaves a stack frame on sm_90 under Triton 3.8: 8 warps, one stage there.
    num_warps = 4 if block_h == BLOCK_HS[0] and block_dv < 256 else 8
    num_stages = 1 if (block_h, block_dv) in ((16, 256), (32, 256)) else 2
    return block_h, block_dv, num_warps, num_stages


def _index_strides(indices: torch.Tensor) -> tuple[int, int, int, int]:
    if indices.dim() == 3:
        stride_ib, stride_im, stride_it = indices.stride()
        return stride_ib, 0, stride_im, stride_it  # one list per query, shared by every head (DSA / MQA)
    return indices.stride()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(programs: int, topk: int, device: torch.device) -> int:
    """Split the topk list only when the row/head programs alone leave SMs idle (decode): aim at ~2 waves,
    at least one BLOCK_N block per split, at most MAX_SPLITS."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(topk, BLOCK_N), triton.cdiv(2 * sms, programs)))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher; inputs already validated by dsattn.ops.sparse_attention. indices: int32, [B, Sq, T] or
    [B, Hkv, Sq, T], any strides. `splits` overrides the decode split-K heuristic and `out` (contiguous
    [B, Hq, Sq, Dv]) the output buffer: both for tests. `lse_out` (contiguous fp32 [B, Hq, Sq]): the
    training forward, which also writes each row's base-2 log-sum-exp (one split)."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    topk = indices.shape[-1]
    if out is None:
        out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    stride_ib, stride_ih, stride_im, stride_it = _index_strides(indices)
    if lse_out is not None:
        splits = 1

    block_h, block_dv, num_warps, num_stages = block_config(groups, dv)
    head_blocks = triton.cdiv(groups, block_h)
    dv_blocks = triton.cdiv(dv, block_dv)
    programs = b * hkv * head_blocks * dv_blocks * sq
    if splits is None:
        splits = num_splits(programs, topk, q.device)
    splits = max(1, min(splits, MAX_SPLITS, max(1, triton.cdiv(topk, BLOCK_N))))
    topk_per_split = max(1, triton.cdiv(triton.cdiv(topk, BLOCK_N), splits)) * BLOCK_N
    splits = max(1, triton.cdiv(topk, topk_per_split))

    if splits > 1:
        partial = torch.empty((b, hq, sq, splits, dv), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, sq, splits), dtype=torch.float32, device=q.device)
        target = partial
    else:
        # Unused when SPLIT and WRITE_LSE are off; its own buffer, so no tensor is passed twice (wrap_triton's
        # mutation analysis).
        lse = torch.empty(1, dtype=torch.float32, device=q.device) if lse_out is None else lse_out
        target = out
    grid = (sq * splits, b * hkv * head_blocks * dv_blocks)
    launch(sparse_attention_fwd_kernel)[grid](
        q, k, v, indices, target, lse,
        *q.stride(), *k.stride(), *v.stride(),
        stride_ib, stride_ih, stride_im, stride_it,
        hkv, groups, sq, sk, topk, dqk, dv,
        head_blocks, dv_blocks, splits, topk_per_split,
        scale * LOG2E, (sk - sq) if causal else sk,
        BLOCK_H=block_h, BLOCK_N=BLOCK_N, BLOCK_DK=BLOCK_DK, BLOCK_DV=block_dv,
        SPLIT=splits > 1, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        # the int32 offsets: within one (batch, kv head) slice of k/v and one query row's GQA group of q
        LONG_OFFSETS=long_offsets(q[0, :groups, 0], k[0, 0], v[0, 0]), WRITE_LSE=lse_out is not None,
        # fp32 training: tf32x3 dots (fp32-accurate) in the forward that saves lse and in the backward
        TF32X3=lse_out is not None and q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        launch(sparse_attention_combine_kernel)[(b * hq * sq, triton.cdiv(dv, COMBINE_BLOCK_DV))](
            partial, lse, out, splits, dv, BLOCK_S=MAX_SPLITS, BLOCK_DV=COMBINE_BLOCK_DV, num_warps=4,
        )
    return out


def sparse_attention_fwd_lse(q, k, v, indices, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: (out, base-2 log-sum-exp fp32 [B, Hq, Sq]; -inf for a row with no valid key)."""
    b, hq, sq, _ = q.shape
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    out = sparse_attention(q, k, v, indices, causal=causal, scale=scale, lse_out=lse)
    return out, lse


# Register cap of the backward: with 8 warps some Triton versions (3.8 on sm_90) cap ptxas at 128 registers
# and the 32-head, 128-column tiles spill; an explicit cap keeps every version at the full register file.
BWD_MAXNREG = 255


def bwd_block_config(groups: int, dqk: int, dv: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_H, BLOCK_DQ, BLOCK_DV, num_warps, num_stages) of the backward: the forward's head blocks; dq/dk
    columns and dv columns in slices of up to 128 (each slice recomputes the scores; wider slices hold
    dq, q and dO tiles that spill), e.g. Dqk 192 / Dv 128 in two programs per row, 576 / 512 in five."""
    block_h = min(max(_next_pow2(groups), BLOCK_HS[0]), BLOCK_HS[-1])
    block_dq = min(max(_next_pow2(dqk), 16), BWD_MAX_SLICE)
    block_dv = min(max(_next_pow2(dv), 16), BWD_MAX_SLICE)
    num_warps = 4 if block_h == BLOCK_HS[0] else 8
    return block_h, block_dq, block_dv, num_warps, 2


def sparse_attention_backward(grad_out, q, k, v, indices, out, lse, *, causal: bool, scale: float):
    """(dq, dk, dv) from the training forward's out and lse. indices: int32 as the forward's. dq in q's
    dtype, dk / dv accumulated in fp32 (atomics) and cast to k's / v's dtype."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    topk = indices.shape[-1]
    dq = torch.zeros((b, hq, sq, dqk), dtype=q.dtype, device=q.device)
    dk = torch.zeros((b, hkv, sk, dqk), dtype=torch.float32, device=q.device)
    dv_ = torch.zeros((b, hkv, sk, dv), dtype=torch.float32, device=q.device)
    if dq.numel() and topk and sk:
        block_h, block_dq, block_dv, num_warps, num_stages = bwd_block_config(groups, dqk, dv)
        head_blocks = triton.cdiv(groups, block_h)
        dq_slices, dv_slices = triton.cdiv(dqk, block_dq), triton.cdiv(dv, block_dv)
        slices = max(dq_slices, dv_slices)
        out = out.contiguous()
        launch(sparse_attention_bwd_kernel)[(sq, b * hkv * head_blocks * slices)](
            q, k, v, indices, out, grad_out, lse, dq, dk, dv_,
            *q.stride(), *k.stride(), *v.stride(), *_index_strides(indices), *grad_out.stride(),
            hkv, groups, sq, sk, topk, dqk, dv,
            head_blocks, slices, dq_slices, dv_slices,
            scale, scale * LOG2E, (sk - sq) if causal else sk,
            BLOCK_H=block_h, BLOCK_N=BLOCK_N, BLOCK_DK=BLOCK_DK, BLOCK_DQ=block_dq, BLOCK_DV=block_dv,
            UPCAST=interpreting() and q.dtype == torch.bfloat16,
            LONG_OFFSETS=long_offsets(q[0, :groups, 0], grad_out[0, :groups, 0], k[0, 0], v[0, 0], dk[0, 0],
                                      dv_[0, 0]),
            TF32X3=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, maxnreg=BWD_MAXNREG,
        )
    return dq, dk.to(k.dtype), dv_.to(v.dtype)


# ------------------------------------------------------------------------------------------------ AOT
# What the JIT sees on the hot path: contiguous head dims and index rows (strides == 1, which it turns into
# constants) and 16-aligned pointers, row strides and sizes (tt.divisibility), so loads vectorize.
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_it")
ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "idx_ptr", "out_ptr", "lse_ptr", "stride_qb", "stride_qh", "stride_qm",
           "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_ib", "stride_im",
           "DQK", "DV", "TOPK", "TOPK_PER_SPLIT")


def _fwd_signature(dtype: torch.dtype, split: bool) -> dict[str, str]:
    sig = {
        "q_ptr": ptr(dtype), "k_ptr": ptr(dtype), "v_ptr": ptr(dtype), "idx_ptr": "*i32",
        "out_ptr": "*fp32" if split else ptr(dtype), "lse_ptr": "*fp32",
    }
    for name in ("q", "k", "v"):
        for axis in ("b", "h", ("m" if name == "q" else "n"), "d"):
            sig[f"stride_{name}{axis}"] = "i32"
    for axis in ("b", "h", "m", "t"):
        sig[f"stride_i{axis}"] = "i32"
    for name in ("HKV", "GROUPS", "SQ", "SK", "TOPK", "DQK", "DV", "HEAD_BLOCKS", "DV_BLOCKS", "NUM_SPLITS",
                 "TOPK_PER_SPLIT"):
        sig[name] = "i32"
    sig["scale_log2"] = "fp32"
    sig["last_key_shift"] = "i32"
    for name in UNIT_STRIDES:
        sig[name] = "constexpr"
    return sig


def aot_specs() -> list[AOTSpec]:
    specs = []
    for dtype in DTYPES:
        for block_h in BLOCK_HS:
            for block_dv in BLOCK_DVS:
                _, _, num_warps, num_stages = block_config(block_h, block_dv)
                for split in (False, True):
                    specs.append(AOTSpec(
                        name=f"fwd_{TRITON_DTYPE[dtype]}_h{block_h}_dv{block_dv}{'_split' if split else ''}",
                        kernel=sparse_attention_fwd_kernel,
                        signature=_fwd_signature(dtype, split),
                        constexprs={"BLOCK_H": block_h, "BLOCK_N": BLOCK_N, "BLOCK_DK": BLOCK_DK,
                                    "BLOCK_DV": block_dv, "SPLIT": split, "UPCAST": False, "LONG_OFFSETS": False,
                                    "WRITE_LSE": False, "TF32X3": False, **{name: 1 for name in UNIT_STRIDES}},
                        divisible_by_16=ALIGNED,
                        num_warps=num_warps,
                        num_stages=num_stages,
                        # fp32 (tf32 on the GPU) is not the fast path: like the other modules' fp32 tiles, a
                        # small stack frame (8-16 B on sm_90 under Triton 3.8) is tolerated and reported.
                        hot=dtype != torch.float32,
                    ))
        # Strided head dims (a caller's odd view): the JIT compiles this unspecialized variant.
        specs.append(AOTSpec(
            name=f"fwd_{TRITON_DTYPE[dtype]}_h64_dv128_any_strides",
            kernel=sparse_attention_fwd_kernel,
            signature={**_fwd_signature(dtype, False), **{name: "i32" for name in UNIT_STRIDES}},
            constexprs={"BLOCK_H": 64, "BLOCK_N": BLOCK_N, "BLOCK_DK": BLOCK_DK, "BLOCK_DV": 128, "SPLIT": False,
                        "UPCAST": False, "LONG_OFFSETS": False, "WRITE_LSE": False, "TF32X3": False},
            num_warps=8,
            num_stages=2,
            hot=False,
        ))
        specs.append(AOTSpec(
            name=f"combine_{TRITON_DTYPE[dtype]}",
            kernel=sparse_attention_combine_kernel,
            signature={"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": ptr(dtype), "NUM_SPLITS": "i32",
                       "DV": "i32"},
            divisible_by_16=("part_ptr", "lse_ptr", "out_ptr", "DV"),
            constexprs={"BLOCK_S": MAX_SPLITS, "BLOCK_DV": COMBINE_BLOCK_DV},
            num_warps=4,
            num_stages=1,
        ))
    specs += _training_specs()
    # The 64-bit variant compiles too (a rare path: not held to the no-spill rule).
    specs += [dataclasses.replace(spec, name=spec.name + "_long", hot=False,
                                  constexprs={**spec.constexprs, "LONG_OFFSETS": True})
              for spec in list(specs) if spec.name in ("fwd_bf16_h16_dv128", "fwd_bf16_h64_dv256", "fwd_bf16_h64_dv256_split",
                                                       "bwd_bf16_h16_dq128_dv128", "bwd_bf16_h64_dq128_dv128")]
    return specs


BWD_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_it", "stride_dod")
BWD_ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "idx_ptr", "o_ptr", "do_ptr", "lse_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
               "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
               "stride_vn", "stride_ib", "stride_im", "stride_dob", "stride_doh", "stride_dom", "DQK", "DV", "TOPK")


def _training_specs() -> list[AOTSpec]:
    """The training forward (WRITE_LSE, one split; Dv slices as the forward's) and the backward at the
    head-dim slices the launcher picks for the usual head dims: 64 (64 / 64) and 128 (128 / 128, and the
    slices of MLA's 192 / 128 and 576 / 512), 16-bit; fp32 (not the fast path) only to show that it compiles."""
    specs = []
    for dtype in DTYPES:
        for block_h in BLOCK_HS if dtype != torch.float32 else BLOCK_HS[:1]:
            for width in (64, 128, 256):
                _, _, num_warps, num_stages = block_config(block_h, width)
                specs.append(AOTSpec(
                    name=f"fwd_lse_{TRITON_DTYPE[dtype]}_h{block_h}_dv{width}",
                    kernel=sparse_attention_fwd_kernel,
                    signature=_fwd_signature(dtype, False),
                    constexprs={"BLOCK_H": block_h, "BLOCK_N": BLOCK_N, "BLOCK_DK": BLOCK_DK, "BLOCK_DV": width,
                                "SPLIT": False, "UPCAST": False, "LONG_OFFSETS": False, "WRITE_LSE": True,
                                "TF32X3": dtype == torch.float32, **{name: 1 for name in UNIT_STRIDES}},
                    divisible_by_16=ALIGNED, num_warps=num_warps, num_stages=num_stages,
                    hot=dtype != torch.float32,
                ))
                if width > BWD_MAX_SLICE:
                    continue
                _, block_dq, block_dv, num_warps, num_stages = bwd_block_config(block_h, width, width)
                p = ptr(dtype)
                signature = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "idx_ptr": "*i32", "o_ptr": p, "do_ptr": p,
                             "lse_ptr": "*fp32", "dq_ptr": p, "dk_ptr": "*fp32", "dv_ptr": "*fp32"}
                for name, axes in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("i", "bhmt"), ("do", "bhmd")):
                    for axis in axes:
                        signature[f"stride_{name}{axis}"] = "i32"
                for name in ("HKV", "GROUPS", "SQ", "SK", "TOPK", "DQK", "DV", "HEAD_BLOCKS", "SLICES", "DQ_SLICES",
                             "DV_SLICES"):
                    signature[name] = "i32"
                signature.update(scale="fp32", scale_log2="fp32", last_key_shift="i32")
                specs.append(AOTSpec(
                    name=f"bwd_{TRITON_DTYPE[dtype]}_h{block_h}_dq{block_dq}_dv{block_dv}",
                    kernel=sparse_attention_bwd_kernel,
                    signature=signature,
                    constexprs={"BLOCK_H": block_h, "BLOCK_N": BLOCK_N, "BLOCK_DK": BLOCK_DK, "BLOCK_DQ": block_dq,
                                "BLOCK_DV": block_dv, "UPCAST": False, "LONG_OFFSETS": False,
                                "TF32X3": dtype == torch.float32, **{name: 1 for name in BWD_UNIT_STRIDES}},
                    divisible_by_16=BWD_ALIGNED, num_warps=num_warps, num_stages=num_stages,
                    maxnreg=BWD_MAXNREG, hot=dtype != torch.float32,
                ))
    return specs

