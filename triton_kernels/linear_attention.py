"""Linear (kernelized) attention in Triton: chunked causal, fused recurrent (decode) and non-causal forms,
and a chunked backward.

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = sum_{j<=i} phi(k_j)^T v_j,   z_i = sum_{j<=i} phi(k_j)

One program owns one (batch, q head) and a BLOCK_DV slice of v/o; it holds its slice of the state
S [Dk, BLOCK_DV] and z [Dk] in fp32 registers and walks the sequence in order (fla's fused-chunk scheme):

- CAUSAL: per chunk of BLOCK_T rows, o = phi(Q) S + tril(phi(Q) phi(K)^T) V (the normalizer likewise from z
  and the masked scores' row sums), then S += phi(K)^T V, z += colsum phi(K). No [S, S] tensor; the
  per-chunk states are never written out, so memory is O(state).
- REDUCE: state only (the non-causal form's first pass, and keys before the first query when Sq < Sk).
- APPLY: o = phi(Q) S / (phi(Q) . z + eps) with a fixed state (the non-causal form's second pass).
- `linear_attention_recurrent_kernel`: one token at a time, O(Dk x Dv) per token, no tl.dot (decode).

The walk is serial, so B x Hq x Dv/BLOCK_DV programs may leave SMs idle (B=1, H=32: 64 programs). Then the
sequence is cut into segments (grid axis 2, fla's chunk scheme at a coarser grain): REDUCE writes each
segment's own state, a prefix sum in torch gives each segment its initial state, and CAUSAL runs every
segment at once; extra memory is one state per segment.

"exp" is exactly exp(x), kept finite by shifts that cancel (as in dsattn.torch_backend.linear_attention): the
state is stored scaled by exp(-m), m [Dk] the running max of the keys per feature dim, rescaled when a chunk
raises it; each query row is shifted by c_i = max_d (q_id + m_d) and eps with it. A causal chunk scores its
rows against keys shifted by the chunk's new max, which is exact unless that max rises far (> EXP_SPREAD) above
the first key of the chunk: then a row's own keys could underflow against a later, invisible one, and the
step shrinks to that first row alone (exact: a row always sees its own key); the next step starts after it.

The backward (maps other than "exp"; that one's is the torch backend's) recomputes per chunk, fla's
chunk_linear_attn scheme without saved states: a forward walk (linear_attention_bwd_dq_kernel) rebuilds
(S, z) before each chunk for dq and each row's 1 / (den + eps), a reverse walk
(linear_attention_bwd_dkdv_kernel) carries (dS, dz) from the final state's cotangents for dk, dv and the
initial state's gradient. Both are serial per (batch, q head, Dv slice); GQA's dk / dv are summed over the
group by the launcher (see the formulas above linear_attention_backward).

The whole Dk sits in one tile (BLOCK_DK = next_pow2(Dk) <= 256): the "exp" map's row shift needs the max
over the head dim, and the scores need the full dot product. GQA: program (b, hq) reads k/v head hq // G in
place. Inputs of any strides; o and the state are contiguous. Dot operands are the input dtype (fp16/bf16;
fp32 inputs use tf32 on the GPU) with fp32 accumulation, the state is carried in fp32.
"""

import torch
import triton
import triton.language as tl

from dsattn.torch_backend.linear_attention import NO_KEY, rescale_state

from ._common import AOTSpec, TRITON_DTYPE, device_capability, interpreting, launch, ptr

FEATURE_MAP_IDS = {"elu": 0, "relu": 1, "exp": 2, "identity": 3}
MODES = {"causal": 0, "reduce": 1, "apply": 2}  # the chunk kernel's MODE
BLOCK_DKS = (32, 64, 128, 256)  # Dk < 32 is padded to 32
MIN_SEG_LEN = 512  # shortest sequence segment worth its own program (see chunk_config)
RECURRENT_MAX_SQ = 16  # causal calls with at most this many queries take the recurrent (decode) kernel
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_KEY = tl.constexpr(NO_KEY)
# A causal chunk whose keys raise the max of some feature dim more than this above the chunk's first key
# (or the carried max) shrinks to that one row: up to here a row's largest term is >= exp(-EXP_SPREAD) and
# the terms lost to fp32 underflow (< exp(-87)) are negligible against it.
EXP_SPREAD = tl.constexpr(40.0)


@triton.jit
def _feature_map(x, mask, FEATURE_MAP: tl.constexpr):
    """phi over the last axis of fp32 x; 0 wherever mask is off (padding must not reach the state)."""
    if FEATURE_MAP == 0:  # elu(x) + 1
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == 1:  # relu
        y = tl.maximum(x, 0.0)
    elif FEATURE_MAP == 2:  # exp, unshifted: only for inputs known to be small (the kernels shift it)
        y = tl.exp(tl.where(mask, x, 0.0))
    else:
        y = x
    return tl.where(mask, y, 0.0)


@triton.jit
def _shifted_readout(den, c, eps, NORMALIZE: tl.constexpr):
    """Per row, the factor that turns num into the output when num, den stand for exp(-c) x the true sums:
    eps is shifted with them; exp(min(c, 0)) scales num and den, exp(-max(c, 0)) eps, so none exceeds 1."""
    if NORMALIZE:
        low = tl.exp(tl.minimum(c, 0.0))
        return low / (den * low + eps * tl.exp(-tl.maximum(c, 0.0)))
    else:
        return tl.exp(c)


@triton.jit
def _exp_token(q, k, v, S, z, m, mask, eps, NORMALIZE: tl.constexpr):
    """One causal token of the "exp" map (fp32 q, k [BLOCK_DK], v [BLOCK_DV]; mask off: padding or no
    token): the state (S, z, m) after its key, and its output o [BLOCK_DV] (the row shifted by its max)."""
    m_new = tl.maximum(m, tl.where(mask, k, _NO_KEY))
    rescale = tl.exp(m - m_new)
    fk = tl.exp(tl.where(mask, k - m_new, float("-inf")))
    S = S * rescale[:, None] + fk[:, None] * v[None, :]
    z = z * rescale + fk
    c = tl.max(tl.where(mask, q + m_new, _NO_KEY), axis=0)
    fq = tl.exp(tl.where(mask, q + m_new - c, float("-inf")))
    o = tl.sum(fq[:, None] * S, axis=0) * _shifted_readout(tl.sum(fq * z, axis=0), c, eps, NORMALIZE)
    return o, S, z, m_new


@triton.jit
def _exp_chunk(q_chunk, k_chunk, v_chunk, o_chunk, q_offs, k_offs, v_offs, o_offs, S, z, m, k, m_new,
               kk_mask, io_mask, eps, OUT_DTYPE: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr,
               DOT_FP32: tl.constexpr):
    """One chunk of the "exp" map with the state and keys shifted by the chunk's new max m_new (CAUSAL when
    that is exact, REDUCE, APPLY): writes the outputs of its rows (CAUSAL, APPLY) and returns the state
    (S, z, m) after its keys (CAUSAL, REDUCE; k: its key tile as loaded, m_new: max(m, its column max))."""
    dot_dtype = q_chunk.dtype.element_ty
    if DOT_FP32:
        dot_dtype = tl.float32
    if MODE != 2:
        rescale = tl.exp(m - m_new)
        S = S * rescale[:, None]
        z = z * rescale
        m = m_new
    if MODE != 1:
        q = tl.load(q_chunk + q_offs, mask=kk_mask, other=0.0).to(tl.float32)
        c = tl.max(tl.where(kk_mask, q + m[None, :], _NO_KEY), axis=1)
        fq = tl.exp(tl.where(kk_mask, q + m[None, :] - c[:, None], float("-inf")))
        fq_dot = fq.to(dot_dtype)
        num = tl.dot(fq_dot, S.to(dot_dtype), out_dtype=tl.float32)
        den = tl.sum(fq * z[None, :], axis=1)
    if MODE != 2:
        v_dot = tl.load(v_chunk + v_offs, mask=io_mask, other=0.0).to(dot_dtype)
        fk = tl.exp(tl.where(kk_mask, k.to(tl.float32) - m[None, :], float("-inf")))
    if MODE == 0:
        scores = tl.dot(fq_dot, tl.trans(fk.to(dot_dtype)), out_dtype=tl.float32)
        offs = tl.arange(0, scores.shape[0])
        scores = tl.where(offs[:, None] >= offs[None, :], scores, 0.0)
        num = tl.dot(scores.to(dot_dtype), v_dot, num, out_dtype=tl.float32)
        den += tl.sum(scores, axis=1)
    if MODE != 1:
        o = num * _shifted_readout(den, c, eps, NORMALIZE)[:, None]
        tl.store(o_chunk + o_offs, o.to(OUT_DTYPE), mask=io_mask)
    if MODE != 2:
        S = tl.dot(tl.trans(fk.to(dot_dtype)), v_dot, S, out_dtype=tl.float32)
        z += tl.sum(fk, axis=0)
    return S, z, m


@triton.jit
def _exp_rows(q_chunk, k_chunk, v_chunk, o_chunk, q_offs, k_offs, v_offs, o_offs, S, z, m, row_mask, dk_mask,
              dv_mask, eps, OUT_DTYPE: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr,
              DOT_FP32: tl.constexpr):
    """One step of the "exp" map over the rows in row_mask: the keys' new max, then _exp_chunk."""
    kk_mask = row_mask[:, None] & dk_mask[None, :]
    io_mask = row_mask[:, None] & dv_mask[None, :]
    k = q_chunk  # APPLY reads no keys
    m_new = m
    if MODE != 2:
        k = tl.load(k_chunk + k_offs, mask=kk_mask, other=0.0)
        m_new = tl.maximum(m, tl.max(tl.where(kk_mask, k.to(tl.float32), _NO_KEY), axis=0))
    return _exp_chunk(q_chunk, k_chunk, v_chunk, o_chunk, q_offs, k_offs, v_offs, o_offs, S, z, m, k, m_new,
                      kk_mask, io_mask, eps, OUT_DTYPE, MODE, NORMALIZE, DOT_FP32)


@triton.jit
def linear_attention_chunk_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, s_in_ptr, z_in_ptr, m_in_ptr, s_out_ptr, z_out_ptr, m_out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HQ, GROUPS, T, DK, DV, SEG_LEN, STATE_SEGS, eps,
    FEATURE_MAP: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    dv_block = tl.program_id(0)
    bh = tl.program_id(1)  # b * HQ + hq
    seg = tl.program_id(2)  # sequence segment [seg * SEG_LEN, (seg + 1) * SEG_LEN)
    b = bh // HQ
    hq = bh % HQ
    hkv = hq // GROUPS
    b64 = b.to(tl.int64)
    bh64 = bh.to(tl.int64)
    state_idx = bh64 * STATE_SEGS + seg % STATE_SEGS  # states: [B * HQ, STATE_SEGS, ...] (1: one shared)
    seg_start = seg * SEG_LEN
    seg_end = tl.minimum(seg_start + SEG_LEN, T)

    offs_t = tl.arange(0, BLOCK_T)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV
    q_base = q_ptr + b64 * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = k_ptr + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    o_base = o_ptr + bh64 * T * DV  # o: contiguous [B, HQ, T, DV]
    # Per-chunk 64-bit base pointers that advance BLOCK_T rows per step, and 32-bit in-tile offsets: a tile
    # of 64-bit pointers per operand would cost two registers per element.
    start64 = seg_start.to(tl.int64)
    q_chunk = q_base + start64 * stride_qm
    k_chunk = k_base + start64 * stride_kn
    v_chunk = v_base + start64 * stride_vn
    o_chunk = o_base + start64 * DV
    q_offs = offs_t[:, None] * stride_qm + offs_dk[None, :] * stride_qd
    k_offs = offs_t[:, None] * stride_kn + offs_dk[None, :] * stride_kd
    v_offs = offs_t[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    o_offs = offs_t[:, None] * DV + offs_dv[None, :]

    if HAS_INITIAL:
        S = tl.load(s_in_ptr + state_idx * DK * DV + offs_dk[:, None] * DV + offs_dv[None, :],
                    mask=dk_mask[:, None] & dv_mask[None, :], other=0.0)
        z = tl.load(z_in_ptr + state_idx * DK + offs_dk, mask=dk_mask, other=0.0)
    else:
        S = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
        z = tl.zeros([BLOCK_DK], dtype=tl.float32)
    # "exp": S and z are stored scaled by exp(-m); padding dims keep NO_KEY and zero state.
    if HAS_INITIAL and FEATURE_MAP == 2:
        m = tl.load(m_in_ptr + state_idx * DK + offs_dk, mask=dk_mask, other=_NO_KEY)
    else:
        m = tl.full([BLOCK_DK], _NO_KEY, dtype=tl.float32)
    causal_mask = offs_t[:, None] >= offs_t[None, :]

    if FEATURE_MAP == 2 and MODE == 0:
        # Steps of BLOCK_T rows; a causal step whose keys raise some feature dim's max more than EXP_SPREAD
        # above its first key (and the carried max) shrinks to that one row (exact: it sees its own key).
        t0 = seg_start
        while t0 < seg_end:
            step = seg_end - t0
            rows_left = (offs_t < step)[:, None] & dk_mask[None, :]
            k = tl.load(k_chunk + k_offs, mask=rows_left, other=0.0).to(tl.float32)
            first = tl.load(k_chunk + offs_dk * stride_kd, mask=dk_mask, other=0.0).to(tl.float32)
            k_max = tl.maximum(m, tl.max(tl.where(rows_left, k, _NO_KEY), axis=0))
            spread = tl.max(tl.where(dk_mask, k_max - tl.maximum(m, first), 0.0))
            step = tl.minimum(tl.where(spread > EXP_SPREAD, 1, step), BLOCK_T)
            S, z, m = _exp_rows(q_chunk, k_chunk, v_chunk, o_chunk, q_offs, k_offs, v_offs, o_offs, S, z, m,
                                offs_t < step, dk_mask, dv_mask, eps, o_ptr.dtype.element_ty, MODE, NORMALIZE,
                                DOT_FP32)
            t0 += step
            q_chunk += step * stride_qm
            k_chunk += step * stride_kn
            v_chunk += step * stride_vn
            o_chunk += step * DV
    elif FEATURE_MAP == 2:
        # REDUCE / APPLY never shrink a step: a counted loop, which the pipeliner can stage.
        for t0 in range(seg_start, seg_end, BLOCK_T):
            S, z, m = _exp_rows(q_chunk, k_chunk, v_chunk, o_chunk, q_offs, k_offs, v_offs, o_offs, S, z, m,
                                offs_t < seg_end - t0, dk_mask, dv_mask, eps, o_ptr.dtype.element_ty, MODE,
                                NORMALIZE, DOT_FP32)
            q_chunk += BLOCK_T * stride_qm
            k_chunk += BLOCK_T * stride_kn
            v_chunk += BLOCK_T * stride_vn
            o_chunk += BLOCK_T * DV
    else:
        for t0 in range(seg_start, seg_end, BLOCK_T):
            rows = t0 + offs_t
            row_mask = rows < seg_end
            if MODE != 1:  # queries: CAUSAL and APPLY
                qk_mask = row_mask[:, None] & dk_mask[None, :]
                q = tl.load(q_chunk + q_offs, mask=qk_mask, other=0.0)
                fq = _feature_map(q.to(tl.float32), qk_mask, FEATURE_MAP)
                if DOT_FP32:
                    fq_dot = fq
                    S_dot = S
                else:
                    fq_dot = fq.to(q.dtype)
                    S_dot = S.to(q.dtype)
                num = tl.dot(fq_dot, S_dot, out_dtype=tl.float32)  # [BLOCK_T, BLOCK_DV]
                den = tl.sum(fq * z[None, :], axis=1)
            if MODE != 2:  # keys: CAUSAL and REDUCE
                kk_mask = row_mask[:, None] & dk_mask[None, :]
                k = tl.load(k_chunk + k_offs, mask=kk_mask, other=0.0)
                v = tl.load(v_chunk + v_offs, mask=row_mask[:, None] & dv_mask[None, :], other=0.0)
                fk = _feature_map(k.to(tl.float32), kk_mask, FEATURE_MAP)
                if DOT_FP32:
                    fk_dot = fk
                    v_dot = v.to(tl.float32)
                else:
                    fk_dot = fk.to(v.dtype)
                    v_dot = v
            if MODE == 0:
                scores = tl.dot(fq_dot, tl.trans(fk_dot), out_dtype=tl.float32)  # [BLOCK_T, BLOCK_T]
                scores = tl.where(causal_mask, scores, 0.0)
                if DOT_FP32:
                    num = tl.dot(scores, v_dot, num, out_dtype=tl.float32)
                else:
                    num = tl.dot(scores.to(v.dtype), v_dot, num, out_dtype=tl.float32)
                den += tl.sum(scores, axis=1)
            if MODE != 1:
                if NORMALIZE:
                    num = num / (den + eps)[:, None]
                tl.store(o_chunk + o_offs, num.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & dv_mask[None, :])
            if MODE != 2:
                S = tl.dot(tl.trans(fk_dot), v_dot, S, out_dtype=tl.float32)
                z += tl.sum(fk, axis=0)
            q_chunk += BLOCK_T * stride_qm
            k_chunk += BLOCK_T * stride_kn
            v_chunk += BLOCK_T * stride_vn
            o_chunk += BLOCK_T * DV

    if STORE_FINAL:  # state tile offsets built here, not kept live across the loop
        offs_sk = tl.arange(0, BLOCK_DK)
        offs_sv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
        tl.store(s_out_ptr + state_idx * DK * DV + offs_sk[:, None] * DV + offs_sv[None, :], S,
                 mask=(offs_sk[:, None] < DK) & (offs_sv[None, :] < DV))
        tl.store(z_out_ptr + state_idx * DK + offs_sk, z, mask=(offs_sk < DK) & (offs_sk * 0 + dv_block == 0))
        if FEATURE_MAP == 2:
            tl.store(m_out_ptr + state_idx * DK + offs_sk, m, mask=(offs_sk < DK) & (offs_sk * 0 + dv_block == 0))


@triton.jit
def linear_attention_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, s_in_ptr, z_in_ptr, m_in_ptr, s_out_ptr, z_out_ptr, m_out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HQ, GROUPS, T, DK, DV, eps,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Causal, one token at a time: S += phi(k_t)^T v_t, z += phi(k_t), o_t = phi(q_t) S / (phi(q_t).z + eps);
    "exp" with the state scaled by exp(-m) (m the running max per feature dim) and o_t's row shifted."""
    dv_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    hkv = hq // GROUPS
    b64 = b.to(tl.int64)
    bh64 = bh.to(tl.int64)

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dk_mask = offs_dk < DK
    dv_mask = offs_dv < DV
    q_base = q_ptr + b64 * stride_qb + hq.to(tl.int64) * stride_qh
    k_base = k_ptr + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    o_base = o_ptr + bh64 * T * DV
    state_offs = offs_dk[:, None] * DV + offs_dv[None, :]
    state_mask = dk_mask[:, None] & dv_mask[None, :]

    if HAS_INITIAL:
        S = tl.load(s_in_ptr + bh64 * DK * DV + state_offs, mask=state_mask, other=0.0)
        z = tl.load(z_in_ptr + bh64 * DK + offs_dk, mask=dk_mask, other=0.0)
    else:
        S = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
        z = tl.zeros([BLOCK_DK], dtype=tl.float32)
    if HAS_INITIAL and FEATURE_MAP == 2:
        m = tl.load(m_in_ptr + bh64 * DK + offs_dk, mask=dk_mask, other=_NO_KEY)
    else:
        m = tl.full([BLOCK_DK], _NO_KEY, dtype=tl.float32)

    for _ in range(0, T):  # the row pointers advance one token per step
        q = tl.load(q_base + offs_dk * stride_qd, mask=dk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_base + offs_dk * stride_kd, mask=dk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_dv * stride_vd, mask=dv_mask, other=0.0).to(tl.float32)
        if FEATURE_MAP == 2:
            num, S, z, m = _exp_token(q, k, v, S, z, m, dk_mask, eps, NORMALIZE)
        else:
            fq = _feature_map(q, dk_mask, FEATURE_MAP)
            fk = _feature_map(k, dk_mask, FEATURE_MAP)
            S += fk[:, None] * v[None, :]
            z += fk
            num = tl.sum(fq[:, None] * S, axis=0)  # [BLOCK_DV]
            if NORMALIZE:
                num = num / (tl.sum(fq * z, axis=0) + eps)
        tl.store(o_base + offs_dv, num.to(o_ptr.dtype.element_ty), mask=dv_mask)
        q_base += stride_qm
        k_base += stride_kn
        v_base += stride_vn
        o_base += DV

    if STORE_FINAL:
        tl.store(s_out_ptr + bh64 * DK * DV + state_offs, S, mask=state_mask)
        tl.store(z_out_ptr + bh64 * DK + offs_dk, z, mask=dk_mask & (offs_dk * 0 + dv_block == 0))  # one writer of z
        if FEATURE_MAP == 2:
            tl.store(m_out_ptr + bh64 * DK + offs_dk, m, mask=dk_mask & (offs_dk * 0 + dv_block == 0))


# ------------------------------------------------------------------------------------------- launcher
def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tile_config(block_dk: int, dtype: torch.dtype, mode: str = "causal", feature_map: str = "elu",
                capability: int = 80) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_DV, num_warps, num_stages) of the chunk kernel for a head-dim tile on sm_<capability>
    (the launcher's device, the AOT specs' per-capability configs). 16-bit tiles up to Dk 128 run two stages
    (the next chunk's q/k/v tiles arrive by cp.async while this one computes), except the "exp" map's causal
    walk, whose data-dependent steps the pipeliner cannot stage. The causal tile (q, k, v, scores and the
    state slice in registers) spills with the second stage's buffers in two places, so there it narrows:
    on sm_80 Dv at Dk 64, on sm_90 the chunk at Dk 128."""
    block_t, block_dv, num_warps = _base_tile(block_dk, dtype, mode, feature_map)
    if dtype == torch.float32 or block_dk > 128 or (feature_map == "exp" and mode == "causal"):
        return block_t, block_dv, num_warps, 1
    if mode == "causal" and capability < 90 and block_dk == 64:
        block_dv = 32
    if mode == "causal" and capability >= 90 and block_dk == 128:
        block_t = 16
    return block_t, block_dv, num_warps, 2


def _base_tile(block_dk: int, dtype: torch.dtype, mode: str, feature_map: str) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_DV, num_warps) before pipelining. The chunk's q/k tiles, the scores and the state slice
    all live in registers; these are the largest that compile without spills on sm_80/sm_90
    (tests/test_aot_compile.py): the Dk=256 tile (Dk 129..256, e.g. MLA's 192) is the exception, compiled
    but allowed to spill. fp32 operands take twice the registers: half the chunk. The "exp" map's causal
    and apply steps carry their shifts (per row, per feature dim) too: smaller tiles."""
    if feature_map == "exp" and mode == "causal":
        if block_dk <= 32:
            return (16 if dtype == torch.float32 else 32), 64, 8
        return (16 if dtype == torch.float32 or block_dk > 64 else 32), (32 if block_dk <= 64 else 16), 8
    if feature_map == "exp" and mode == "apply" and dtype == torch.float32 and block_dk == 32:
        return 16, 64, 8
    if block_dk <= 64:
        return (16 if dtype == torch.float32 and block_dk == 64 else 32), 64, 8
    if dtype == torch.float32:  # (16 x 128 fp32 on sm_80: reduce spills under 8 warps, apply under 4)
        return 16, 32, (8 if mode == "causal" or (mode == "apply" and block_dk == 128) else 4)
    if block_dk <= 128:
        return 32, 32, 8
    return 16, 32, 8


def chunk_config(dk: int, dv: int, heads: int, seq: int, dtype: torch.dtype, device: torch.device,
                 segments: int | None = None, mode: str = "causal", feature_map: str = "elu"):
    """(BLOCK_T, BLOCK_DK, BLOCK_DV, num_warps, num_stages, segments, seg_len) for `heads` = B x Hq sequences
    of `seq` on `device` (its capability picks the tile, see tile_config).

    The walk over a sequence is serial, so when the B x Hq x Dv/BLOCK_DV programs leave SMs idle the
    sequence is cut into segments (>= MIN_SEG_LEN long, up to ~8 programs per SM): a first pass reduces each
    segment to its state, a prefix sum gives each segment its initial state, and the segments then run in
    parallel."""
    block_dk = max(BLOCK_DKS[0], _next_pow2(dk))
    capability = device_capability(device)
    block_t, block_dv, num_warps, num_stages = tile_config(block_dk, dtype, mode, feature_map, capability)
    # The split depends on neither the mode nor the map: a call's reduce and causal passes cut alike.
    split_t, split_dv, _, _ = tile_config(block_dk, dtype, "reduce", capability=capability)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wide = heads * triton.cdiv(dv, split_dv)
    if segments is None:
        segments = 1 if wide >= 2 * sms else max(1, min(triton.cdiv(seq, MIN_SEG_LEN), triton.cdiv(8 * sms, wide)))
    seg_len = max(split_t, triton.cdiv(triton.cdiv(max(seq, 1), segments), split_t) * split_t)
    segments = max(1, triton.cdiv(seq, seg_len))
    return block_t, block_dk, block_dv, num_warps, num_stages, segments, seg_len


def recurrent_config(dk: int) -> tuple[int, int, int]:
    """(BLOCK_DK, BLOCK_DV, num_warps) for the decode kernel: a [BLOCK_DK, 32] fp32 state slice."""
    block_dk = max(BLOCK_DKS[0], _next_pow2(dk))
    return block_dk, 32, 4 if block_dk <= 128 else 8


def _zero_state(rows: int, segs: int, dk: int, dv: int, device):
    """(S, z, m) of no key: m is the "exp" map's shift (NO_KEY before any key; unused by the other maps)."""
    return (torch.zeros((rows, segs, dk, dv), dtype=torch.float32, device=device),
            torch.zeros((rows, segs, dk), dtype=torch.float32, device=device),
            torch.full((rows, segs, dk), NO_KEY, dtype=torch.float32, device=device))


def _empty_state(rows: int, segs: int, dk: int, dv: int, device):
    return (torch.empty((rows, segs, dk, dv), dtype=torch.float32, device=device),
            torch.empty((rows, segs, dk), dtype=torch.float32, device=device),
            torch.empty((rows, segs, dk), dtype=torch.float32, device=device))


def _combine(a, b, exp: bool):
    """The state after a's keys, then b's (states (S, z, m) [rows, n, ...], n broadcasting)."""
    if not exp:
        return a[0] + b[0], a[1] + b[1], a[2]
    m = torch.maximum(a[2], b[2])
    Sa, za = rescale_state(a[0], a[1], a[2], m)
    Sb, zb = rescale_state(b[0], b[1], b[2], m)
    return Sa + Sb, za + zb, m


class _Pass:
    """What every launch of one call shares: tensors' shapes and the feature-map/normalize options."""

    def __init__(self, q, k, v, out, feature_map, normalize, eps, segments):
        self.q, self.out = q, out
        self.b, self.hq, self.dk, self.dv = q.shape[0], q.shape[1], q.shape[3], v.shape[3]
        self.groups = self.hq // k.shape[1]
        self.flags = dict(FEATURE_MAP=FEATURE_MAP_IDS[feature_map], NORMALIZE=normalize)
        self.feature_map = feature_map
        self.exp = feature_map == "exp"
        self.eps = eps
        self.segments = segments
        self.no_state = torch.empty(1, dtype=torch.float32, device=q.device)  # fp32 stand-in for absent states
        self.dot_fp32 = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)

    def chunk(self, mode, q, k, v, t, state_in, state_out, *, segments=None, state_segs=None):
        """Chunk kernel over t rows (of q for causal/apply, of k/v for reduce). States are (S, z, m) shaped
        [B*Hq, state_segs, ...]; returns the number of segments used."""
        block_t, block_dk, block_dv, num_warps, num_stages, segs, seg_len = chunk_config(
            self.dk, self.dv, self.b * self.hq, t, self.q.dtype, self.q.device,
            self.segments if segments is None else segments, mode, self.feature_map)
        if state_segs is None:
            state_segs = segs
        none = (self.no_state,) * 3
        grid = (triton.cdiv(self.dv, block_dv), self.b * self.hq, segs)
        launch(linear_attention_chunk_kernel)[grid](
            q, k, v, self.out, *(state_in or none), *(state_out or none), *q.stride(), *k.stride(), *v.stride(),
            self.hq, self.groups, t, self.dk, self.dv, seg_len, state_segs, self.eps,
            **self.flags, MODE=MODES[mode], HAS_INITIAL=state_in is not None, STORE_FINAL=state_out is not None,
            DOT_FP32=self.dot_fp32, BLOCK_T=block_t, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
            num_warps=num_warps, num_stages=num_stages,
        )
        return segs

    def segments_for(self, t):
        return chunk_config(self.dk, self.dv, self.b * self.hq, t, self.q.dtype, self.q.device, self.segments)[5]

    def reduce(self, k, v, state):
        """state (or zeros) + every key of k/v, as a new [B*Hq, 1, ...] state; segmented when it pays."""
        t = k.shape[2]
        segs = self.segments_for(t)
        if segs == 1:
            final = _empty_state(self.b * self.hq, 1, self.dk, self.dv, self.q.device)
            self.chunk("reduce", self.q, k, v, t, state, final, segments=1)
            return final
        partial = _empty_state(self.b * self.hq, segs, self.dk, self.dv, self.q.device)
        self.chunk("reduce", self.q, k, v, t, None, partial)
        if self.exp:
            m = partial[2].amax(dim=1, keepdim=True)
            total = (*(x.sum(dim=1, keepdim=True) for x in rescale_state(*partial, m)), m)
        else:
            total = tuple(p.sum(dim=1, keepdim=True) for p in partial)
        return total if state is None else _combine(state, total, self.exp)

    def causal(self, q, k, v, state, want_final, kernel):
        """Causal outputs of q over k/v (same length) from state; returns the final state if wanted."""
        t = q.shape[2]
        rows = self.b * self.hq
        if kernel == "recurrent":
            final = _empty_state(rows, 1, self.dk, self.dv, q.device) if want_final else None
            block_dk, block_dv, num_warps = recurrent_config(self.dk)
            none = (self.no_state,) * 3
            launch(linear_attention_recurrent_kernel)[(triton.cdiv(self.dv, block_dv), rows)](
                q, k, v, self.out, *(state or none), *(final or none), *q.stride(), *k.stride(), *v.stride(),
                self.hq, self.groups, t, self.dk, self.dv, self.eps, **self.flags,
                HAS_INITIAL=state is not None, STORE_FINAL=final is not None,
                BLOCK_DK=block_dk, BLOCK_DV=block_dv, num_warps=num_warps, num_stages=1,
            )
            return final
        segs = self.segments_for(t)
        if segs == 1:
            final = _empty_state(rows, 1, self.dk, self.dv, q.device) if want_final else None
            self.chunk("causal", q, k, v, t, state, final, segments=1)
            return final
        # Segments: reduce each, exclusive prefix (from the initial state), then all segments at once.
        partial = _empty_state(rows, segs, self.dk, self.dv, q.device)
        self.chunk("reduce", q, k, v, t, None, partial)
        if self.exp:  # each prefix at the max of the keys before it (a later segment's max would underflow it)
            running = state if state is not None else _zero_state(rows, 1, self.dk, self.dv, q.device)
            prefixes = []
            for i in range(segs):
                prefixes.append(running)
                running = _combine(running, tuple(p[:, i:i + 1] for p in partial), True)
            prefix = tuple(torch.cat(parts, dim=1).contiguous() for parts in zip(*prefixes))
            inclusive_last = running
        else:
            inclusive = [p.cumsum(dim=1) for p in partial]
            if state is not None:
                inclusive = [c + s for c, s in zip(inclusive, state)]
            start = state if state is not None else _zero_state(rows, 1, self.dk, self.dv, q.device)
            prefix = tuple(torch.cat([s0, c[:, :-1]], dim=1).contiguous() for s0, c in zip(start, inclusive))
            inclusive_last = tuple(c[:, -1:].contiguous() for c in inclusive)
        self.chunk("causal", q, k, v, t, prefix, None)
        return inclusive_last if want_final else None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str,
    causal: bool,
    normalize: bool,
    eps: float,
    initial_state=None,
    output_final_state: bool = False,
    kernel: str | None = None,
    segments: int | None = None,
    out: torch.Tensor | None = None,
):
    """Launcher; inputs validated by dsattn.ops.linear_attention. initial_state: (S, z) or (S, z, m) fp32
    (m None or absent: unscaled), or None. Returns (o, (S [B, Hq, Dk, Dv], z [B, Hq, Dk], m [B, Hq, Dk] or
    None) or None); for "exp" S and z are scaled by exp(-m), the other maps return m None. For tests:
    `kernel` ("chunk" | "recurrent") overrides the causal path choice, `segments` the sequence split, `out`
    (contiguous [B, Hq, Sq, Dv]) the output buffer."""
    b, hq, sq, dk = q.shape
    sk, dv = k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    run = _Pass(q, k, v, out, feature_map, normalize, eps, segments)
    state = None  # kernel layout [B*Hq, 1, ...]
    if initial_state is not None:
        S0, z0 = initial_state[0], initial_state[1]
        m0 = initial_state[2] if len(initial_state) > 2 and initial_state[2] is not None else torch.zeros_like(z0)
        state = (S0.reshape(b * hq, 1, dk, dv).contiguous(), z0.reshape(b * hq, 1, dk).contiguous(),
                 m0.reshape(b * hq, 1, dk).contiguous())

    # Keys no query reads through the causal mask (non-causal: all of them; causal with Sq < Sk: the
    # first Sk - Sq) are first reduced into the state.
    reduce_len = sk if not causal else sk - sq
    if reduce_len > 0:
        state = run.reduce(k[:, :, :reduce_len], v[:, :, :reduce_len], state)
    final = None
    if causal and sq > 0:
        if kernel is None:
            kernel = "recurrent" if sq <= RECURRENT_MAX_SQ else "chunk"
        final = run.causal(q, k[:, :, reduce_len:], v[:, :, reduce_len:], state, output_final_state, kernel)
    else:
        if sq > 0:
            segs = run.segments_for(sq)
            run.chunk("apply", q, k, v, sq, state, None, segments=segs, state_segs=1)
        if output_final_state:
            if state is None:  # no keys and no initial state
                final = _zero_state(b * hq, 1, dk, dv, q.device)
            else:
                final = state if reduce_len > 0 else tuple(t.clone() for t in state)  # never alias the caller's
    if final is not None:
        final = (final[0].reshape(b, hq, dk, dv), final[1].reshape(b, hq, dk),
                 final[2].reshape(b, hq, dk) if run.exp else None)
    return out, final


# ------------------------------------------------------------------------------------------- backward
# The formulas (linear_attention_backward). Per query row i (num_i = phi(q_i) S_i, den_i = phi(q_i) . z_i,
# o_i = num_i r_i with r_i = 1 / (den_i + eps); without normalize r_i = 1 and the den terms drop):
#   dnum_i = do_i r_i,   dden_i = -(do_i . o_i) r_i          (delta_i = do_i . o_i, from the saved output)
#   dphi(q_i) = dnum_i S_i^T + dden_i z_i                   (S_i, z_i: the state row i reads)
#   dS_j = G_S + sum_{i sees j} phi(q_i)^T dnum_i,  dz_j = G_z + sum_{i sees j} dden_i phi(q_i)
#   dv_j = phi(k_j) dS_j,   dphi(k_j) = v_j dS_j^T + dz_j
# (G_S, G_z: the final state's cotangents; the initial state's gradient is dS, dz over every query.) The dq
# pass walks forward carrying (S, z) as the forward does; the dk/dv pass walks backward carrying (dS, dz).
# Both split Dv into BLOCK_DV slices like the forward: dphi(q) and dphi(k) sum over Dv, so each slice
# writes its partial (the z / dz terms in slice 0 only) and the launcher sums them.


@triton.jit
def _feature_map_grad(x, FEATURE_MAP: tl.constexpr):
    """phi'(x) elementwise of fp32 x (maps 0, 1, 3; "exp" takes the torch backward)."""
    if FEATURE_MAP == 0:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == 1:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _bwd_program(q_ptr, k_ptr, v_ptr, do_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                 stride_dob, stride_doh, HQ, GROUPS, DK, DV, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    """What both backward kernels' programs start from: (Dv slice, 64-bit b * HQ + hq, row / Dk / Dv offsets,
    Dk / Dv masks, and the q, k, v (kv head hq // GROUPS), dO bases of program (Dv slice, b * HQ + hq))."""
    dv_block = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // HQ).to(tl.int64)
    hq = bh % HQ
    hkv = (hq // GROUPS).to(tl.int64)
    hq = hq.to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return (dv_block, bh.to(tl.int64), tl.arange(0, BLOCK_T), offs_dk, offs_dv, offs_dk < DK, offs_dv < DV,
            q_ptr + b64 * stride_qb + hq * stride_qh, k_ptr + b64 * stride_kb + hkv * stride_kh,
            v_ptr + b64 * stride_vb + hkv * stride_vh, do_ptr + b64 * stride_dob + hq * stride_doh)


@triton.jit
def _bwd_state(s_ptr, z_ptr, bh64, offs_dk, offs_dv, dk_mask, dv_mask, DK, DV, HAS_INITIAL: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A program's slice of a [B * HQ, DK, DV] state and its [B * HQ, DK] vector (zeros without one)."""
    if HAS_INITIAL:
        S = tl.load(s_ptr + bh64 * DK * DV + offs_dk[:, None] * DV + offs_dv[None, :],
                    mask=dk_mask[:, None] & dv_mask[None, :], other=0.0)
        z = tl.load(z_ptr + bh64 * DK + offs_dk, mask=dk_mask, other=0.0)
    else:
        S = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
        z = tl.zeros([BLOCK_DK], dtype=tl.float32)
    return S, z


@triton.jit
def linear_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, s_in_ptr, z_in_ptr, dq_ptr, r_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dq_blk, HQ, GROUPS, T, DK, DV, eps,
    FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INITIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dphi(q) phi'(q) of one (batch, q head) and Dv slice, T query rows in order: CAUSAL reads the keys of
    the same rows (S, z advance per chunk), else the fixed state (S, z) every row reads. Writes r (slice 0)."""
    dv_block, bh64, offs_t, offs_dk, offs_dv, dk_mask, dv_mask, q_base, k_base, v_base, do_base = _bwd_program(
        q_ptr, k_ptr, v_ptr, do_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_dob,
        stride_doh, HQ, GROUPS, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)
    first = dv_block == 0
    dq_base = dq_ptr + dv_block.to(tl.int64) * stride_dq_blk + bh64 * T * DK  # [blocks, B*HQ, T, DK]
    S, z = _bwd_state(s_in_ptr, z_in_ptr, bh64, offs_dk, offs_dv, dk_mask, dv_mask, DK, DV, HAS_INITIAL,
                      BLOCK_DK, BLOCK_DV)
    causal_mask = offs_t[:, None] >= offs_t[None, :]
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + offs_t
        row_mask = rows < T
        qk_mask = row_mask[:, None] & dk_mask[None, :]
        io_mask = row_mask[:, None] & dv_mask[None, :]
        q = tl.load(q_base + offs_t[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                    mask=qk_mask, other=0.0)
        dot_dtype = tl.float32 if UPCAST else q.dtype
        qf = q.to(tl.float32)
        fq = _feature_map(qf, qk_mask, FEATURE_MAP)
        do = tl.load(do_base + offs_t[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=io_mask, other=0.0).to(tl.float32)
        if CAUSAL:
            k = tl.load(k_base + offs_t[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                        mask=qk_mask, other=0.0)
            v = tl.load(v_base + offs_t[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=io_mask, other=0.0)
            fk_dot = _feature_map(k.to(tl.float32), qk_mask, FEATURE_MAP).to(dot_dtype)
            v_dot = v.to(dot_dtype)
        if NORMALIZE:
            den = tl.sum(fq * z[None, :], axis=1)
            if CAUSAL:
                scores = tl.dot(fq.to(dot_dtype), tl.trans(fk_dot), input_precision=PRECISION,
                                out_dtype=tl.float32)
                den += tl.sum(tl.where(causal_mask, scores, 0.0), axis=1)
            r = 1.0 / (den + eps)
            delta = tl.load(delta_ptr + bh64 * T + rows, mask=row_mask, other=0.0)
            dden = tl.where(first, -delta * r, 0.0)
            dnum = do * r[:, None]
            tl.store(r_ptr + bh64 * T + rows, r, mask=row_mask & (rows * 0 + dv_block == 0))
        else:
            dden = tl.zeros([BLOCK_T], dtype=tl.float32)
            dnum = do
        dnum_dot = dnum.to(dot_dtype)
        dfq = tl.dot(dnum_dot, tl.trans(S.to(dot_dtype)), input_precision=PRECISION, out_dtype=tl.float32)
        dfq += dden[:, None] * z[None, :]
        if CAUSAL:
            dp = tl.dot(dnum_dot, tl.trans(v_dot), input_precision=PRECISION, out_dtype=tl.float32)
            dp = tl.where(causal_mask, dp + dden[:, None], 0.0)
            dfq = tl.dot(dp.to(dot_dtype), fk_dot, dfq, input_precision=PRECISION, out_dtype=tl.float32)
            S = tl.dot(tl.trans(fk_dot), v_dot, S, input_precision=PRECISION, out_dtype=tl.float32)
            z += tl.sum(fk_dot.to(tl.float32), axis=0)
        dq = dfq * _feature_map_grad(qf, FEATURE_MAP)
        tl.store(dq_base + rows[:, None] * DK + offs_dk[None, :], dq, mask=qk_mask)
        # 64-bit bases advance a chunk per step (in-tile offsets stay 32-bit).
        q_base += BLOCK_T * stride_qm
        k_base += BLOCK_T * stride_kn
        v_base += BLOCK_T * stride_vn
        do_base += BLOCK_T * stride_dom


@triton.jit
def linear_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, delta_ptr, r_ptr, ds_in_ptr, dz_in_ptr, ds_out_ptr, dz_out_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dk_blk, stride_dk_bh, stride_dv_bh, HQ, GROUPS, T, DK, DV,
    FEATURE_MAP: tl.constexpr, MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_INITIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The reverse walk of one (batch, q head) and Dv slice over T rows, carrying (dS, dz) from (ds_in, dz_in)
    (or zeros) and storing them at the end. MODE (MODES): 0 queries and the keys of the same rows (causal),
    1 keys only (they read the fixed dS: absorbed keys), 2 queries only (they add to dS). Keys write dv and
    their slice's partial dphi(k) phi'(k) (rows of dk/dv at the q head's own [T, D] block)."""
    dv_block, bh64, offs_t, offs_dk, offs_dv, dk_mask, dv_mask, q_base, k_base, v_base, do_base = _bwd_program(
        q_ptr, k_ptr, v_ptr, do_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_dob,
        stride_doh, HQ, GROUPS, DK, DV, BLOCK_T, BLOCK_DK, BLOCK_DV)
    first = dv_block == 0
    dk_base = dk_ptr + dv_block.to(tl.int64) * stride_dk_blk + bh64 * stride_dk_bh
    dv_base = dv_ptr + bh64 * stride_dv_bh
    state_mask = dk_mask[:, None] & dv_mask[None, :]
    dS, dz = _bwd_state(ds_in_ptr, dz_in_ptr, bh64, offs_dk, offs_dv, dk_mask, dv_mask, DK, DV, HAS_INITIAL,
                        BLOCK_DK, BLOCK_DV)
    causal_mask = offs_t[:, None] >= offs_t[None, :]  # [query row, key row]
    chunks = tl.cdiv(T, BLOCK_T)
    last = ((chunks - 1) * BLOCK_T).to(tl.int64)  # the walk starts at the last chunk; bases step back
    q_base += last * stride_qm
    k_base += last * stride_kn
    v_base += last * stride_vn
    do_base += last * stride_dom
    for c in range(0, chunks):
        t0 = (chunks - 1 - c) * BLOCK_T
        rows = t0 + offs_t
        row_mask = rows < T
        rk_mask = row_mask[:, None] & dk_mask[None, :]
        io_mask = row_mask[:, None] & dv_mask[None, :]
        if MODE != 1:
            q = tl.load(q_base + offs_t[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                        mask=rk_mask, other=0.0)
            dot_dtype = tl.float32 if UPCAST else q.dtype
            fq = _feature_map(q.to(tl.float32), rk_mask, FEATURE_MAP)
            fq_dot = fq.to(dot_dtype)
            do = tl.load(do_base + offs_t[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=io_mask, other=0.0).to(tl.float32)
            if NORMALIZE:
                r = tl.load(r_ptr + bh64 * T + rows, mask=row_mask, other=0.0)
                delta = tl.load(delta_ptr + bh64 * T + rows, mask=row_mask, other=0.0)
                dden = -delta * r
                dnum = do * r[:, None]
            else:
                dden = tl.zeros([BLOCK_T], dtype=tl.float32)
                dnum = do
            dnum_dot = dnum.to(dot_dtype)
            dz_chunk = tl.sum(fq * dden[:, None], axis=0)  # now: fq's fp32 tile need not stay live
        if MODE != 2:
            k = tl.load(k_base + offs_t[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                        mask=rk_mask, other=0.0)
            v = tl.load(v_base + offs_t[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=io_mask, other=0.0)
            dot_dtype = tl.float32 if UPCAST else k.dtype
            fk_dot = _feature_map(k.to(tl.float32), rk_mask, FEATURE_MAP).to(dot_dtype)
            v_dot = v.to(dot_dtype)
            # The later chunks' (and the final state's) part: dS, dz before this chunk's queries add theirs.
            dS_dot = dS.to(dot_dtype)
            dv = tl.dot(fk_dot, dS_dot, input_precision=PRECISION, out_dtype=tl.float32)
            dfk = tl.dot(v_dot, tl.trans(dS_dot), input_precision=PRECISION, out_dtype=tl.float32)
            dfk += tl.where(first, dz, 0.0)[None, :]
            if MODE == 0:
                p = tl.dot(fq_dot, tl.trans(fk_dot), input_precision=PRECISION, out_dtype=tl.float32)
                p = tl.where(causal_mask, p, 0.0)
                dv = tl.dot(tl.trans(p.to(dot_dtype)), dnum_dot, dv, input_precision=PRECISION,
                            out_dtype=tl.float32)
                dp = tl.dot(dnum_dot, tl.trans(v_dot), input_precision=PRECISION, out_dtype=tl.float32)
                dp = tl.where(causal_mask, dp + tl.where(first, dden, 0.0)[:, None], 0.0)
                dfk = tl.dot(tl.trans(dp.to(dot_dtype)), fq_dot, dfk, input_precision=PRECISION,
                             out_dtype=tl.float32)
            tl.store(dv_base + rows[:, None] * DV + offs_dv[None, :], dv, mask=io_mask)
            # k reloaded (a cache hit) for phi'(k) rather than kept live through the dots.
            k = tl.load(k_base + offs_t[:, None] * stride_kn + offs_dk[None, :] * stride_kd, mask=rk_mask,
                        other=0.0).to(tl.float32)
            tl.store(dk_base + rows[:, None] * DK + offs_dk[None, :], dfk * _feature_map_grad(k, FEATURE_MAP),
                     mask=rk_mask)
        if MODE != 1:
            dS = tl.dot(tl.trans(fq_dot), dnum_dot, dS, input_precision=PRECISION, out_dtype=tl.float32)
            dz += dz_chunk
        q_base -= BLOCK_T * stride_qm
        k_base -= BLOCK_T * stride_kn
        v_base -= BLOCK_T * stride_vn
        do_base -= BLOCK_T * stride_dom
    tl.store(ds_out_ptr + bh64 * DK * DV + offs_dk[:, None] * DV + offs_dv[None, :], dS, mask=state_mask)
    tl.store(dz_out_ptr + bh64 * DK + offs_dk, dz, mask=dk_mask & (offs_dk * 0 + dv_block == 0))


def bwd_tile_config(block_dk: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_DV, num_warps, num_stages) of both backward kernels. Besides the forward's tiles they
    hold the gradient state or dphi(q) and two [BLOCK_T, BLOCK_T] blocks: the reverse kernel spills on sm_80
    from 16 x 64 at Dk 64 and 16 x 32 at Dk 128 (16-bit), so these are its largest spill-free tiles; 16-bit
    runs two stages (cp.async of the next chunk) on sm_80 and sm_90 alike, still without spills."""
    stages = 1 if dtype == torch.float32 else 2
    if block_dk <= 32:
        return 16, 32, 4, stages
    if block_dk <= 64:
        return 16, 32, 8, stages
    return 16, 16, 8, stages


def linear_attention_backward(grad_o, grad_S, grad_z, q, k, v, o, S0, z0, *, feature_map: str, causal: bool,
                              normalize: bool, eps: float, block_t: int | None = None):
    """(dq, dk, dv, dS0, dz0) of linear_attention (maps other than "exp") for the cotangents of o and of the
    final state (grad_S, grad_z: None for zero), o the forward's output; dS0 / dz0 are fp32 [B, Hq, ...]
    (the gradient of the state the walk starts from, whether or not one was given). `block_t`: tests."""
    b, hq, sq, dk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    rows, groups = b * hq, hq // hkv
    dev = q.device
    block_dk = max(BLOCK_DKS[0], _next_pow2(dk))
    tile_t, block_dv, num_warps, num_stages = bwd_tile_config(block_dk, q.dtype)
    block_t = block_t or tile_t
    n_dv = triton.cdiv(dv, block_dv)
    flags = dict(FEATURE_MAP=FEATURE_MAP_IDS[feature_map], NORMALIZE=normalize,
                 UPCAST=q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16),
                 PRECISION="tf32x3" if q.dtype == torch.float32 else None,
                 BLOCK_T=block_t, BLOCK_DK=block_dk, BLOCK_DV=block_dv, num_warps=num_warps,
                 num_stages=num_stages)
    grid = (n_dv, rows)
    if grad_o is None:
        grad_o = torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=dev)
    none = torch.empty(1, dtype=torch.float32, device=dev)

    # The state the queries read first: causal, the initial one plus the keys before the first query;
    # non-causal, the final one.
    state = None
    if S0 is not None:
        state = (S0.reshape(rows, 1, dk, dv).float().contiguous(), z0.reshape(rows, 1, dk).float().contiguous(),
                 torch.zeros(rows, 1, dk, dtype=torch.float32, device=dev))
    reduce_len = sk - sq if causal else sk
    if reduce_len > 0:
        run = _Pass(q, k, v, none, feature_map, normalize, eps, None)
        state = run.reduce(k[:, :, :reduce_len], v[:, :, :reduce_len], state)
    k_tail, v_tail = k[:, :, reduce_len:], v[:, :, reduce_len:]
    delta = (grad_o.float() * o.float()).sum(-1).reshape(rows, sq).contiguous() if normalize else none
    r = torch.empty(rows, sq, dtype=torch.float32, device=dev) if normalize else none

    dq_part = torch.empty(n_dv, rows, sq, dk, dtype=torch.float32, device=dev)
    if sq > 0:
        launch(linear_attention_bwd_dq_kernel)[grid](
            q, k_tail, v_tail, grad_o, delta, *(none, none) if state is None else (state[0], state[1]), dq_part, r,
            *q.stride(), *k_tail.stride(), *v_tail.stride(), *grad_o.stride(), dq_part.stride(0),
            hq, groups, sq, dk, dv, eps, CAUSAL=causal, HAS_INITIAL=state is not None, **flags)

    dk_part = torch.empty(n_dv, rows, sk, dk, dtype=torch.float32, device=dev)
    dv_full = torch.empty(rows, sk, dv, dtype=torch.float32, device=dev)
    dS = [torch.empty(rows, dk, dv, dtype=torch.float32, device=dev) for _ in range(2)]
    dz = [torch.empty(rows, dk, dtype=torch.float32, device=dev) for _ in range(2)]
    incoming = None
    if grad_S is not None or grad_z is not None:
        incoming = (torch.zeros(rows, dk, dv, dtype=torch.float32, device=dev) if grad_S is None
                    else grad_S.reshape(rows, dk, dv).float().contiguous(),
                    torch.zeros(rows, dk, dtype=torch.float32, device=dev) if grad_z is None
                    else grad_z.reshape(rows, dk).float().contiguous())

    def reverse(mode, kk, vv, t, rows_from, ds_in, out):
        dk_view, dv_view = dk_part[:, :, rows_from:], dv_full[:, rows_from:]
        launch(linear_attention_bwd_dkdv_kernel)[grid](
            q, kk, vv, grad_o, delta, r, *(none, none) if ds_in is None else ds_in, dS[out], dz[out], dk_view,
            dv_view, *q.stride(), *kk.stride(), *vv.stride(), *grad_o.stride(), dk_part.stride(0),
            dk_part.stride(1), dv_full.stride(0), hq, groups, t, dk, dv, MODE=MODES[mode],
            HAS_INITIAL=ds_in is not None, **flags)
        return dS[out], dz[out]

    # The queries' walk (causal: with the keys of their rows), then the keys every query sees alike.
    grads = incoming
    if causal:
        if sq > 0:
            grads = reverse("causal", k_tail, v_tail, sq, reduce_len, grads, 0)
    elif sq > 0:
        grads = reverse("apply", k, v, sq, 0, grads, 0)  # MODE 2: queries only
    if reduce_len > 0:
        reverse("reduce", k, v, reduce_len, 0, grads, 1)  # MODE 1: keys only, reading dS
    if grads is None:
        grads = (torch.zeros(rows, dk, dv, dtype=torch.float32, device=dev),
                 torch.zeros(rows, dk, dtype=torch.float32, device=dev))
    dq = dq_part.sum(0).reshape(b, hq, sq, dk).to(q.dtype)
    dk_ = dk_part.sum(0).reshape(b, hkv, groups, sk, dk).sum(2).to(k.dtype)
    dv_ = dv_full.reshape(b, hkv, groups, sk, dv).sum(2).to(v.dtype)
    return dq, dk_, dv_, grads[0].reshape(b, hq, dk, dv).clone(), grads[1].reshape(b, hq, dk).clone()


# ------------------------------------------------------------------------------------------------ AOT
# What the JIT sees on the hot path: contiguous head dims (stride 1, a constant to it) and 16-aligned pointers,
# row strides and head dims (tt.divisibility), so the tile loads vectorize and can be asynchronous copies.
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd")
BWD_UNIT_STRIDES = (*UNIT_STRIDES, "stride_dod")
ALIGNED_STRIDES = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb",
                   "stride_vh", "stride_vn", "DK", "DV")


def _aligned(signature: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name, kind in signature.items() if kind.startswith("*")) + tuple(
        name for name in (*ALIGNED_STRIDES, "stride_dob", "stride_doh", "stride_dom") if name in signature)


def _signature(dtype: torch.dtype, chunk: bool) -> dict[str, str]:
    sig = {"q_ptr": ptr(dtype), "k_ptr": ptr(dtype), "v_ptr": ptr(dtype), "o_ptr": ptr(dtype),
           "s_in_ptr": "*fp32", "z_in_ptr": "*fp32", "m_in_ptr": "*fp32",
           "s_out_ptr": "*fp32", "z_out_ptr": "*fp32", "m_out_ptr": "*fp32"}
    for name, axes in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd")):
        for axis in axes:
            sig[f"stride_{name}{axis}"] = "i32"
    for name in ("HQ", "GROUPS", "T", "DK", "DV") + (("SEG_LEN", "STATE_SEGS") if chunk else ()):
        sig[name] = "i32"
    sig["eps"] = "fp32"
    if chunk:
        sig.update({name: "constexpr" for name in UNIT_STRIDES})
    return sig


CAPABILITIES = (80, 90)  # the architectures whose chunk configs differ (tile_config)


def aot_specs() -> list[AOTSpec]:
    """Every config the launcher can pick: per dtype, BLOCK_DK x mode for the chunk kernel (each spec holds
    its sm_80 and sm_90 tiles), compiled normalized, with initial and final state, for "exp" (its shifted
    steps) and, where the other maps' tile differs, for "elu" (the costliest of the others); BLOCK_DK for
    the recurrent kernel ("exp")."""
    specs = []
    for dtype in DTYPES:
        for block_dk in BLOCK_DKS:
            def configs(mode_name, fmap):
                return {cap: tile_config(block_dk, dtype, mode_name, fmap, cap) for cap in CAPABILITIES}

            kinds = [(mode_name, fmap) for mode_name in MODES for fmap in ("exp", "elu")
                     if fmap == "exp" or configs(mode_name, fmap) != configs(mode_name, "exp")]
            for mode_name, fmap in kinds:
                if dtype == torch.float16 and block_dk > 128:
                    continue  # not hot: compiles and sizes shared memory as its bf16 twin (same tiles) does
                per_cap = {cap: {"num_warps": num_warps, "num_stages": num_stages,
                                 "constexprs": {"BLOCK_T": block_t, "BLOCK_DV": block_dv}}
                           for cap, (block_t, block_dv, num_warps, num_stages) in configs(mode_name, fmap).items()}
                suffix = "_elu" if fmap == "elu" else ""
                signature = _signature(dtype, chunk=True)
                specs.append(AOTSpec(
                    name=f"chunk_{mode_name}{suffix}_{TRITON_DTYPE[dtype]}_dk{block_dk}",
                    kernel=linear_attention_chunk_kernel,
                    signature=signature,
                    constexprs={"FEATURE_MAP": FEATURE_MAP_IDS[fmap], "MODE": MODES[mode_name], "NORMALIZE": True,
                                "HAS_INITIAL": True, "STORE_FINAL": True, "DOT_FP32": dtype == torch.float32,
                                "BLOCK_DK": block_dk, **per_cap[80]["constexprs"],
                                **{name: 1 for name in UNIT_STRIDES}},
                    divisible_by_16=_aligned(signature),
                    num_warps=per_cap[80]["num_warps"],
                    num_stages=per_cap[80]["num_stages"],
                    per_capability=per_cap,
                    # fp32 "exp" causal at Dk 128 keeps a small stack frame even at 16 x 16 (fp32 is not
                    # the hot dtype; bf16/fp16 at Dk <= 128 are spill-free).
                    hot=block_dk <= 128 and not (fmap == "exp" and mode_name == "causal" and block_dk == 128
                                                 and dtype == torch.float32),
                ))
            rec_dk, rec_dv, rec_warps = recurrent_config(block_dk)
            specs.append(AOTSpec(
                name=f"recurrent_{TRITON_DTYPE[dtype]}_dk{rec_dk}_dv{rec_dv}",
                kernel=linear_attention_recurrent_kernel,
                signature=_signature(dtype, chunk=False),
                constexprs={"FEATURE_MAP": FEATURE_MAP_IDS["exp"], "NORMALIZE": True, "HAS_INITIAL": True,
                            "STORE_FINAL": True, "BLOCK_DK": rec_dk, "BLOCK_DV": rec_dv},
                num_warps=rec_warps,
                num_stages=1,
            ))
    specs += _bwd_aot_specs()
    return specs


def _bwd_aot_specs() -> list[AOTSpec]:
    """The backward's hot configs only (16-bit at Dk 64 and 128; causal, normalized, from a state)."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        for block_dk in (64, 128):
            block_t, block_dv, num_warps, num_stages = bwd_tile_config(block_dk, dtype)
            tiles = {"FEATURE_MAP": FEATURE_MAP_IDS["elu"], "NORMALIZE": True, "HAS_INITIAL": True, "UPCAST": False,
                     "PRECISION": None, "BLOCK_T": block_t, "BLOCK_DK": block_dk, "BLOCK_DV": block_dv,
                     **{name: 1 for name in BWD_UNIT_STRIDES}}
            for name, kernel, extra in (("bwd_dq", linear_attention_bwd_dq_kernel, {"CAUSAL": True}),
                                        ("bwd_dkdv", linear_attention_bwd_dkdv_kernel, {"MODE": MODES["causal"]})):
                signature = _bwd_signature(dtype, name == "bwd_dq")
                specs.append(AOTSpec(
                    name=f"{name}_{TRITON_DTYPE[dtype]}_dk{block_dk}_dv{block_dv}",
                    kernel=kernel,
                    signature=signature,
                    constexprs={**tiles, **extra},
                    divisible_by_16=_aligned(signature),
                    num_warps=num_warps,
                    num_stages=num_stages,
                ))
    return specs


def _bwd_signature(dtype: torch.dtype, dq: bool) -> dict[str, str]:
    inputs = ("q_ptr", "k_ptr", "v_ptr", "do_ptr")
    fp32 = (("delta_ptr", "s_in_ptr", "z_in_ptr", "dq_ptr", "r_ptr") if dq else
            ("delta_ptr", "r_ptr", "ds_in_ptr", "dz_in_ptr", "ds_out_ptr", "dz_out_ptr", "dk_ptr", "dv_ptr"))
    sig = {**{name: ptr(dtype) for name in inputs}, **{name: "*fp32" for name in fp32}}
    for name, axes in (("q", "bhmd"), ("k", "bhnd"), ("v", "bhnd"), ("do", "bhmd")):
        for axis in axes:
            sig[f"stride_{name}{axis}"] = "i32"
    strides = ("stride_dq_blk",) if dq else ("stride_dk_blk", "stride_dk_bh", "stride_dv_bh")
    for name in (*strides, "HQ", "GROUPS", "T", "DK", "DV"):
        sig[name] = "i32"
    if dq:
        sig["eps"] = "fp32"
    sig.update({name: "constexpr" for name in BWD_UNIT_STRIDES})
    return sig
