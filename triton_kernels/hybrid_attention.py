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

Feature maps are applied once in PyTorch (dsattn.reference.linear_attention.feature_map, the single
definition) and the kernels read phi(q), phi(k) in the input dtype.

Batch bases are 64-bit; head bases, a block's first row / key and the state chunk bases are 64-bit too when a
per-batch tensor reaches past 2^31 elements (LONG_OFFSETS, set by the launcher from shapes and strides; the
usual shapes keep int32 offsets, which hold fewer registers). Offsets within a tile stay int32.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, TRITON_DTYPE as TRITON_NAME, interpreting, launch, long_offsets, ptr

CHUNK = 256  # keys per far-state chunk (multiple of BLOCK_N)
STATE_BLOCK_DV = 64
STATE_BLOCK_N = 64
STATE_WARPS = 8
STATE_BLOCK_D = 32  # Dqk slice of the phi(q) . state product in the main kernel


@triton.jit
def hybrid_chunk_state_kernel(
    phik_ptr, v_ptr, kv_ptr, ksum_ptr,
    HKV, SK, DQK, DV, PREFIX,
    s_pkb, s_pkh, s_pks, s_pkd,
    s_vb, s_vh, s_vs, s_vd,
    s_kvb, s_kvh, s_kvc, s_kvd,
    s_ksb, s_ksh, s_ksc,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, LONG_OFFSETS: tl.constexpr,
):
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
        phik_t = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd,
                         mask=far[None, :] & (rd[:, None] < DQK), other=0.0)
        v = tl.load(v_blk + rk[:, None] * s_vs + re[None, :] * s_vd,
                    mask=far[:, None] & (re[None, :] < DV), other=0.0)
        if UPCAST:
            phik_t = phik_t.to(tl.float32)
            v = v.to(tl.float32)
        kv += tl.dot(phik_t, v, out_dtype=tl.float32)
        ksum += tl.sum(phik_t.to(tl.float32), axis=1)
    base = kv_ptr + b * s_kvb + h * s_kvh + chunk_l * s_kvc
    tl.store(base + rd[:, None] * s_kvd + re[None, :], kv, mask=(rd[:, None] < DQK) & (re[None, :] < DV))
    if pid_dv == 0:
        tl.store(ksum_ptr + b * s_ksb + h * s_ksh + chunk_l * s_ksc + rd, ksum, mask=rd < DQK)


@triton.jit
def hybrid_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, phiq_ptr, phik_ptr, kv_ptr, ksum_ptr, o_ptr,
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
    UPCAST: tl.constexpr, IEEE: tl.constexpr, LONG_OFFSETS: tl.constexpr,
):
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

    # ---- exact keys: prefix [0, min(prefix, p_last + 1)) then the window band [max(prefix, p - window + 1), p]
    prefix_hi = tl.minimum(PREFIX, p_last + 1)
    band_lo = tl.maximum(tl.maximum(PREFIX, p_first - WINDOW + 1), 0)
    band_hi = tl.where(WINDOW > 0, p_last + 1, 0)
    band_start = (band_lo // BLOCK_N) * BLOCK_N
    n_prefix_blocks = tl.cdiv(tl.maximum(prefix_hi, 0), BLOCK_N)
    n_band_blocks = tl.cdiv(tl.maximum(band_hi - band_start, 0), BLOCK_N)
    for it in range(0, n_prefix_blocks + n_band_blocks):
        in_prefix = it < n_prefix_blocks
        start = tl.where(in_prefix, it * BLOCK_N, band_start + (it - n_prefix_blocks) * BLOCK_N)
        rj = start + rn
        key_ok = rj < SK
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
        visible = (rj[None, :] <= pos[:, None]) & key_ok[None, :]
        # the two ranges are disjoint: prefix blocks take j < prefix, band blocks j >= prefix
        in_set = tl.where(in_prefix, rj[None, :] < PREFIX, (rj[None, :] >= PREFIX) & (rj[None, :] > pos[:, None] - WINDOW))
        s = tl.where(visible & in_set, s, float("-inf"))
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
        # phi(q) . state[t], reading phi(q) and the fp32 state in Dqk slices to keep registers low
        for d0 in range(0, BLOCK_DQK, STATE_BLOCK_D):
            dcols = d0 + rdc
            phiq_d = tl.load(phiq_base + dcols[None, :] * s_pqd, mask=row_ok[:, None] & (dcols[None, :] < DQK), other=0.0)
            phiq_d = phiq_d.to(tl.float32)
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
            phik = tl.load(phik_blk + rk[None, :] * s_pks + rd[:, None] * s_pkd, mask=(rj[None, :] < SK) & dqk_ok[:, None], other=0.0)
            v = tl.load(v_blk + rk[:, None] * s_vs + re[None, :] * s_vd, mask=(rj[:, None] < SK) & dv_ok[None, :], other=0.0)
            if UPCAST:
                phik = phik.to(tl.float32)
                v = v.to(tl.float32)
            a = tl.dot(phiq, phik, out_dtype=tl.float32)
            far = (rj[None, :] >= PREFIX) & (rj[None, :] <= pos[:, None] - WINDOW)
            a = tl.where(far, a, 0.0)
            l_i += tl.sum(a, axis=1)
            acc += tl.dot(a.to(v.dtype), v, out_dtype=tl.float32)

    # a zero denominator (no visible key, or far products summing to 0) gives a 0 row, never NaN
    den_ok = l_i != 0.0
    out = acc / tl.where(den_ok, l_i, 1.0)[:, None]
    out = tl.where(den_ok[:, None], out, 0.0)
    if LONG_OFFSETS:
        o_rows = o_ptr + b * s_ob + hq * s_oh + (pid_m * BLOCK_M).to(tl.int64) * s_os
    else:
        o_rows = o_ptr + b * s_ob + hq * s_oh
    tl.store(
        o_rows + rows[:, None] * s_os + re[None, :] * s_od,
        out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :],
    )


HEAD_BLOCKS = (64, 128, 256)  # padded head dims the kernels are built for (aot_specs lists each)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _head_block(n: int) -> int:
    return max(HEAD_BLOCKS[0], triton.next_power_of_2(n))


def fwd_config(block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of the main kernel for padded head dims and dtype. BLOCK_M = 64 with 8 warps: the
    kernel holds the softmax accumulator, a phi(q) . state slice and the far-key tiles at once, and
    BLOCK_M = 128 reaches 255 registers at D = 128 (measured with the AOT check)."""
    wide = max(block_dqk, block_dv) >= 256 or dtype == torch.float32
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2}


def hybrid_attention(q, k, v, phi_q, phi_k, *, prefix: int, window: int, scale: float, out=None) -> torch.Tensor:
    """Launch both kernels. q/phi_q [B, Hq, Sq, Dqk], k/phi_k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv]: any
    strides, one dtype; validation is done by dsattn.ops.hybrid_attention. `out` (optional) receives the result."""
    b, hq, sq, dqk = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_dqk, block_dv = _head_block(dqk), _head_block(dv)
    upcast = interpreting() and q.dtype == torch.bfloat16
    num_chunks = max(1, triton.cdiv(sk, CHUNK))
    # states[:, :, t] = far sums over keys [prefix, t * CHUNK); t = 0 .. num_chunks - 1 are the ones read
    kv_state = torch.zeros((b, hkv, num_chunks, dqk, dv), dtype=torch.float32, device=q.device)
    k_state = torch.zeros((b, hkv, num_chunks, dqk), dtype=torch.float32, device=q.device)
    first = prefix // CHUNK  # chunks before it hold no far key: their states stay 0
    n = num_chunks - 1 - first  # chunk c's sums land in state c + 1; the last chunk's are never read
    if n > 0:
        kv_sums, k_sums = kv_state[:, :, first + 1:], k_state[:, :, first + 1:]
        phik_c, v_c = phi_k[:, :, first * CHUNK:], v[:, :, first * CHUNK:]
        launch(hybrid_chunk_state_kernel)[(n, b * hkv, triton.cdiv(dv, STATE_BLOCK_DV))](
            phik_c, v_c, kv_sums, k_sums,
            hkv, phik_c.shape[2], dqk, dv, prefix - first * CHUNK,
            *phik_c.stride(), *v_c.stride(), *kv_sums.stride()[:4], *k_sums.stride()[:3],
            CHUNK=CHUNK, BLOCK_N=STATE_BLOCK_N, BLOCK_DQK=block_dqk, BLOCK_DV=STATE_BLOCK_DV, UPCAST=upcast,
            # per batch: batch bases are already 64-bit
            LONG_OFFSETS=long_offsets(*(t[0] for t in (phik_c, v_c, kv_sums, k_sums))), num_warps=STATE_WARPS,
        )
        kv_sums.cumsum_(dim=2)  # per-chunk sums -> exclusive prefix sums over chunks
        k_sums.cumsum_(dim=2)
    cfg = fwd_config(block_dqk, block_dv, q.dtype)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)
    launch(hybrid_attention_fwd_kernel)[grid](
        q, k, v, phi_q, phi_k, kv_state, k_state, out,
        hq, hq // hkv, sq, sk, dqk, dv, prefix, window, num_chunks, scale,
        *q.stride(), *k.stride(), *v.stride(), *phi_q.stride(), *phi_k.stride(),
        *kv_state.stride()[:4], *k_state.stride()[:3], *out.stride(),
        CHUNK=CHUNK, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, STATE_BLOCK_D=STATE_BLOCK_D,
        UPCAST=upcast, IEEE=q.dtype == torch.float32,
        LONG_OFFSETS=long_offsets(*(t[0] for t in (q, k, v, phi_q, phi_k, kv_state, k_state, out))),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _int_args(*names):
    return {n: "i32" for n in names}


def _strides(prefix, dims="bhsd"):
    # the last-dim stride is 1 on the hot path (contiguous or [B, S, H, D] views): Triton's launcher
    # specializes an int argument equal to 1 into a constant, so the AOT check compiles that variant
    return _int_args(*(f"s_{prefix}{d}" for d in dims[:-1]))



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
                signature={"phik_ptr": t, "v_ptr": t, "kv_ptr": "*fp32", "ksum_ptr": "*fp32",
                           **_int_args("HKV", "SK", "DQK", "DV", "PREFIX"), **_strides("pk"), **_strides("v"),
                           **_strides("kv", "bhcd"), **_int_args("s_ksb", "s_ksh", "s_ksc")},
                constexprs={"CHUNK": CHUNK, "BLOCK_N": STATE_BLOCK_N, "BLOCK_DQK": block_dqk, "BLOCK_DV": STATE_BLOCK_DV,
                            "UPCAST": False, "LONG_OFFSETS": False, **{n: 1 for n in ("s_pkd", "s_vd", "s_kvd")}},
                num_warps=STATE_WARPS, num_stages=1,
                hot=half,
            ))
            for block_dv in HEAD_BLOCKS:
                cfg = fwd_config(block_dqk, block_dv, dtype)
                specs.append(AOTSpec(
                    name=f"fwd_{TRITON_NAME[dtype]}_dqk{block_dqk}_dv{block_dv}",
                    kernel=hybrid_attention_fwd_kernel,
                    signature={
                        "q_ptr": t, "k_ptr": t, "v_ptr": t, "phiq_ptr": t, "phik_ptr": t,
                        "kv_ptr": "*fp32", "ksum_ptr": "*fp32", "o_ptr": t,
                        **_int_args("HQ", "GROUP", "SQ", "SK", "DQK", "DV", "PREFIX", "WINDOW", "NUM_STATES"),
                        "scale": "fp32",
                        **_strides("q"), **_strides("k"), **_strides("v"), **_strides("pq"), **_strides("pk"),
                        **_strides("kv", "bhcd"), **_int_args("s_ksb", "s_ksh", "s_ksc"), **_strides("o"),
                    },
                    constexprs={"CHUNK": CHUNK, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                                "BLOCK_DQK": block_dqk, "BLOCK_DV": block_dv, "STATE_BLOCK_D": STATE_BLOCK_D,
                                "UPCAST": False, "IEEE": not half, "LONG_OFFSETS": False,
                                **{n: 1 for n in ("s_qd", "s_kd", "s_vd", "s_pqd", "s_pkd", "s_kvd", "s_od")}},
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    hot=half and (block_dqk, block_dv) in hot_dims,
                ))
    # The 64-bit variants compile too (a rare path: not held to the no-spill rule).
    specs += [dataclasses.replace(spec, name=spec.name + "_long", hot=False,
                                  constexprs={**spec.constexprs, "LONG_OFFSETS": True})
              for spec in list(specs) if spec.name in ("chunk_state_bf16_dqk128", "fwd_bf16_dqk128_dv128",
                                                       "fwd_bf16_dqk256_dv128")]
    return specs
