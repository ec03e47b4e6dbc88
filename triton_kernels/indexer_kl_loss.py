"""DeepSeek-V3.2's indexer KL objective in Triton (semantics: dsattn.reference.indexer_kl_loss).

One program owns one query row (dense rows and sparse lists alike: a row's keys are its own). It walks the
row's key slots BLOCK_N at a time: the dense stage's visible keys 0 .. min(Sk, pos + 1) (causal) or all Sk,
or the sparse stage's cleaned list (each visible key once, -1 = none; dsattn.torch_backend.indexer_kl_loss.
clean_indices), gathering the keys. Nothing of size [Sq, Sk] is ever stored.

- indexer_kl_lse_kernel (pass 1): per (row, kv head, block of BLOCK_G of its q heads) the target's
  log-sum-exp L over the row's keys, online (q heads are the tl.dot's rows).
- indexer_kl_kernel (pass 2), forward: per key tile the index scores I (one tl.dot of the row's index heads
  [HI_PAD, Di] with the keys [Di, BLOCK_N], relu, times the head weights, summed over heads), the target
  p = mean_h exp(s_h - L_h) (a loop over the kv heads' q-head blocks, one tl.dot each), and, online, the
  row's lse of I and sum_j p_j log p_j - p_j I_j: KL_i = that sum + lse_I (sum_j p_j = 1).
  BACKWARD: from the saved lse_I, dI = g (exp(I - lse_I) - p) / rows per key tile, through the relu:
  dw += sum_j dI relu(a), da = dI w [a > 0] * index_scale, dq_idx += da @ k_idx (registers, the program
  owns its row), dk_idx += da^T @ q_idx by fp32 atomics (keys are shared between rows).
fp32 inputs run their dots as tf32x3 (fp32-accurate on tensor cores); fp16/bf16 accumulate in fp32.
Offsets: 64-bit batch / row / key bases; 32-bit within a tile.
"""

import torch
import triton
import triton.language as tl

from dsattn.torch_backend.indexer_kl_loss import prepare

from ._common import AOTSpec, TRITON_DTYPE, interpreting, launch, ptr

BLOCK_N = 32  # keys per step
MAX_BLOCK_G = 64  # q heads per target tl.dot
MAX_BLOCK_DQK = 128  # target head dim per tl.dot (larger: several chunks, e.g. MLA's 192 or absorbed 576)


def num_stages(dtype: torch.dtype) -> int:
    """fp32's tf32x3 operand tiles take 160 KB of shared memory unpipelined (the backward at Hi=64, Di=128):
    no second stage for them."""
    return 1 if dtype == torch.float32 else 2


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (x - 1).bit_length()))


@triton.jit
def indexer_kl_lse_kernel(
    q_ptr, k_ptr, idx_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    SQ, SK, H, GROUPS, G_BLOCKS, DQK, TOPK, scale, last_key_shift,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, DQK_CHUNKS: tl.constexpr,
    SPARSE: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """lse [B, H, SQ] fp32 (natural log; -inf for a row without keys)."""
    i = tl.program_id(0)
    pid = tl.program_id(1)  # batch x kv head x q-head block
    gb = pid % G_BLOCKS
    kv = (pid // G_BLOCKS) % (H // GROUPS)
    b64 = (pid // (G_BLOCKS * (H // GROUPS))).to(tl.int64)
    heads = kv * GROUPS + gb * BLOCK_G + tl.arange(0, BLOCK_G)
    head_ok = heads < (kv + 1) * GROUPS
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQK)
    if SPARSE:
        n_slots = TOPK
    elif CAUSAL:
        n_slots = tl.minimum(SK, tl.maximum(i + last_key_shift + 1, 0))
    else:
        n_slots = SK
    idx_row = (b64 * SQ + i) * TOPK
    q_rows = q_ptr + b64 * stride_qb + tl.cast(i, tl.int64) * stride_qm + heads[:, None].to(tl.int64) * stride_qh
    if DQK_CHUNKS == 1:  # the q tile stays in registers across the key loop
        q = tl.load(q_rows + offs_dq[None, :] * stride_qd, mask=head_ok[:, None] & (offs_dq < DQK)[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong
            q = q.to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + kv.to(tl.int64) * stride_kh
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    for t in range(0, n_slots, BLOCK_N):
        # The row's keys in slots t .. t + BLOCK_N (64-bit ids), and which slots hold one.
        slot = t + offs_n
        if SPARSE:
            keys = tl.load(idx_ptr + idx_row + slot, mask=slot < n_slots, other=-1).to(tl.int64)
            key_ok = (slot < n_slots) & (keys >= 0)
        else:
            keys = slot.to(tl.int64)
            key_ok = slot < n_slots
        s = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        for dc in tl.static_range(DQK_CHUNKS):
            d = dc * BLOCK_DQK + offs_dq
            if DQK_CHUNKS > 1:
                q = tl.load(q_rows + d[None, :] * stride_qd, mask=head_ok[:, None] & (d < DQK)[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
            kt = tl.load(k_base + keys[None, :] * stride_kn + d[:, None] * stride_kd,
                         mask=key_ok[None, :] & (d < DQK)[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, s, input_precision=PRECISION, out_dtype=tl.float32)
        s = tl.where(key_ok[None, :], s * scale, float("-inf"))
        new_m = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        total = total * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
        m = new_m
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + (b64 * H + heads) * SQ + i, lse, mask=head_ok)


@triton.jit
def indexer_kl_kernel(
    qi_ptr, ki_ptr, w_ptr, q_ptr, k_ptr, idx_ptr, lse_ptr, lse_i_ptr, kl_ptr, g_ptr, dqi_ptr, dki_ptr, dw_ptr,
    stride_qib, stride_qim, stride_qih, stride_qid,
    stride_kib, stride_kin, stride_kid,
    stride_wb, stride_wm, stride_wh,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    SQ, SK, HI, DI, H, GROUPS, G_BLOCKS, DQK, TOPK, scale, index_scale, last_key_shift,
    HI_PAD: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, DQK_CHUNKS: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr,
    BACKWARD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward: kl [B, SQ] (0 for a row without keys) and lse_i [B, SQ]. BACKWARD: dq_idx [B, SQ, HI, DI] and
    dw [B, SQ, HI] (fp32, contiguous, written), dk_idx [B, SK, DI] (fp32, contiguous, added to)."""
    i = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, HI_PAD)
    offs_di = tl.arange(0, BLOCK_DI)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQK)
    h_ok = offs_h < HI
    di_ok = offs_di < DI
    if SPARSE:
        n_slots = TOPK
    elif CAUSAL:
        n_slots = tl.minimum(SK, tl.maximum(i + last_key_shift + 1, 0))
    else:
        n_slots = SK
    row = b64 * SQ + i
    idx_row = row * TOPK
    qi = tl.load(qi_ptr + b64 * stride_qib + tl.cast(i, tl.int64) * stride_qim + offs_h[:, None] * stride_qih
                 + offs_di[None, :] * stride_qid, mask=h_ok[:, None] & di_ok[None, :], other=0.0)
    if UPCAST:
        qi = qi.to(tl.float32)
    w = tl.load(w_ptr + b64 * stride_wb + tl.cast(i, tl.int64) * stride_wm + offs_h * stride_wh, mask=h_ok,
                other=0.0).to(tl.float32)
    ki_base = ki_ptr + b64 * stride_kib
    q_base = q_ptr + b64 * stride_qb + tl.cast(i, tl.int64) * stride_qm
    k_base = k_ptr + b64 * stride_kb
    lse_base = lse_ptr + b64 * H * SQ + i
    inv_h = 1.0 / H
    if BACKWARD:
        lse_i = tl.load(lse_i_ptr + row)
        lse_i = tl.where(lse_i == float("-inf"), 0.0, lse_i)
        g = tl.load(g_ptr)
        dqi = tl.zeros([HI_PAD, BLOCK_DI], dtype=tl.float32)
        dw = tl.zeros([HI_PAD], dtype=tl.float32)
    else:
        m = tl.full([], float("-inf"), dtype=tl.float32)
        total = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([], dtype=tl.float32)
    for t in range(0, n_slots, BLOCK_N):
        slot = t + offs_n
        if SPARSE:
            keys = tl.load(idx_ptr + idx_row + slot, mask=slot < n_slots, other=-1).to(tl.int64)
            key_ok = (slot < n_slots) & (keys >= 0)
        else:
            keys = slot.to(tl.int64)
            key_ok = slot < n_slots
        kt = tl.load(ki_base + keys[None, :] * stride_kin + offs_di[:, None] * stride_kid,
                     mask=key_ok[None, :] & di_ok[:, None], other=0.0)  # [BLOCK_DI, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        a = tl.dot(qi, kt, input_precision=PRECISION, out_dtype=tl.float32) * index_scale
        relu = tl.maximum(a, 0.0)
        score = tl.sum(relu * w[:, None], axis=0)  # [BLOCK_N]
        p = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c in range(0, (H // GROUPS) * G_BLOCKS):
            kv = c // G_BLOCKS
            heads = kv * GROUPS + (c % G_BLOCKS) * BLOCK_G + offs_g
            head_ok = heads < (kv + 1) * GROUPS
            s = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
            for dc in tl.static_range(DQK_CHUNKS):
                d = dc * BLOCK_DQK + offs_dq
                q = tl.load(q_base + heads[:, None].to(tl.int64) * stride_qh + d[None, :] * stride_qd,
                            mask=head_ok[:, None] & (d < DQK)[None, :], other=0.0)
                k = tl.load(k_base + kv.to(tl.int64) * stride_kh + keys[None, :] * stride_kn + d[:, None] * stride_kd,
                            mask=key_ok[None, :] & (d < DQK)[:, None], other=0.0)
                if UPCAST:
                    q, k = q.to(tl.float32), k.to(tl.float32)
                s = tl.dot(q, k, s, input_precision=PRECISION, out_dtype=tl.float32)
            s = s * scale
            lse = tl.load(lse_base + heads.to(tl.int64) * SQ, mask=head_ok, other=float("inf"))
            p += tl.sum(tl.where(head_ok[:, None] & key_ok[None, :], tl.exp(s - lse[:, None]), 0.0), axis=0)
        p = p * inv_h
        if BACKWARD:
            d_score = tl.where(key_ok, tl.exp(score - lse_i) - p, 0.0) * g
            dw += tl.sum(relu * d_score[None, :], axis=1)
            da = tl.where(a > 0, d_score[None, :] * w[:, None], 0.0) * index_scale  # [HI_PAD, BLOCK_N]
            da = da.to(kt.dtype)
            dqi = tl.dot(da, tl.trans(kt), dqi, input_precision=PRECISION, out_dtype=tl.float32)
            dk = tl.dot(tl.trans(da), qi, input_precision=PRECISION, out_dtype=tl.float32)
            tl.atomic_add(dki_ptr + (b64 * SK + keys[:, None]) * DI + offs_di[None, :], dk,
                          mask=key_ok[:, None] & di_ok[None, :])
        else:
            masked = tl.where(key_ok, score, float("-inf"))
            new_m = tl.maximum(m, tl.max(masked, axis=0))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            total = total * tl.exp(m - safe) + tl.sum(tl.exp(masked - safe), axis=0)
            m = new_m
            plogp = tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
            acc += tl.sum(tl.where(key_ok, plogp - p * score, 0.0), axis=0)
    if BACKWARD:
        tl.store(dqi_ptr + (row * HI + offs_h[:, None]) * DI + offs_di[None, :], dqi,
                 mask=h_ok[:, None] & di_ok[None, :])
        tl.store(dw_ptr + row * HI + offs_h, dw, mask=h_ok)
    else:
        lse_i = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        tl.store(lse_i_ptr + row, lse_i)
        tl.store(kl_ptr + row, tl.where(total > 0, acc + lse_i, 0.0))


# ------------------------------------------------------------------------------------------- launcher
def _config(groups: int, dqk: int, hi: int, di: int) -> dict:
    """Tiles: the GQA group's q heads (up to MAX_BLOCK_G per dot) and the index heads, padded to tl.dot's 16
    rows; whole head dims (the capability caps them at 256)."""
    block_g = min(_pow2(groups), MAX_BLOCK_G)
    block_dqk = min(_pow2(dqk), MAX_BLOCK_DQK)
    return dict(BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_DQK=block_dqk, DQK_CHUNKS=triton.cdiv(dqk, block_dqk),
                HI_PAD=_pow2(hi), BLOCK_DI=_pow2(di))


def _common(q_idx, k_idx, q, k, indices, causal):
    """The forward's and the backward's preamble: (q_idx, k_idx, q, k in one dtype (_same_dtype), what idx_ptr
    gets (the cleaned lists as int32; a placeholder when dense), sparse, topk, the loss's row count)."""
    q_idx, k_idx, q, k = _same_dtype(q_idx, k_idx, q, k)
    clean, rows = prepare(q_idx, k_idx, indices, causal)
    idx = q_idx.new_empty((1,), dtype=torch.int32) if clean is None else clean.to(torch.int32).contiguous()
    return q_idx, k_idx, q, k, idx, clean is not None, 0 if clean is None else clean.shape[-1], rows


def _flags(dtype, causal, sparse):
    return dict(SPARSE=sparse, CAUSAL=causal, UPCAST=interpreting() and dtype == torch.bfloat16,
                PRECISION="tf32x3" if dtype == torch.float32 else None)


def _lse(q, k, idx, sparse, topk, causal, scale, cfg, flags, num_warps):
    b, h, sq, dqk = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    groups = h // hkv
    g_blocks = triton.cdiv(groups, cfg["BLOCK_G"])
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if lse.numel():
        launch(indexer_kl_lse_kernel)[(sq, b * hkv * g_blocks)](
            q, k, idx, lse, *q.stride(), *k.stride(), sq, sk, h, groups, g_blocks, dqk, topk, float(scale), sk - sq,
            BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=cfg["BLOCK_DQK"],
            DQK_CHUNKS=cfg["DQK_CHUNKS"], num_warps=num_warps,
            num_stages=num_stages(q.dtype), **flags)
    return lse


def _same_dtype(q_idx, k_idx, q, k):
    """One dtype for every tl.dot operand (the op selected Triton for this promoted dtype)."""
    common = torch.promote_types(torch.promote_types(q_idx.dtype, k_idx.dtype), q.dtype)
    return q_idx.to(common), k_idx.to(common), q.to(common), k.to(common)


def _kl_launch(q_idx, k_idx, weights, q, k, idx, lse, lse_i, kl, g, dqi, dki, dw, sparse, topk, causal, scale,
               index_scale, backward):
    b, sq, hi, di = q_idx.shape
    h, dqk = q.shape[1], q.shape[3]
    hkv, sk = k.shape[1], k.shape[2]
    cfg = _config(h // hkv, dqk, hi, di)
    launch(indexer_kl_kernel)[(sq, b)](
        q_idx, k_idx, weights, q, k, idx, lse, lse_i, kl, g, dqi, dki, dw,
        *q_idx.stride(), *k_idx.stride(), *weights.stride(), *q.stride(), *k.stride(),
        sq, sk, hi, di, h, h // hkv, triton.cdiv(h // hkv, cfg["BLOCK_G"]), dqk, topk, float(scale),
        float(index_scale), sk - sq, BACKWARD=backward, num_warps=num_warps(cfg, backward),
        num_stages=num_stages(q.dtype),
        **cfg, **_flags(q_idx.dtype, causal, sparse))


def num_warps(cfg: dict, backward: bool) -> int:
    return 8 if backward or cfg["HI_PAD"] * cfg["BLOCK_DI"] >= 64 * 128 else 4


def indexer_kl_loss_fwd(q_idx, k_idx, weights, q, k, indices=None, *, scale, index_scale, causal=True):
    """Launcher (inputs validated by the op): (loss fp32 scalar, L fp32 [B, H, Sq], lse_I fp32 [B, Sq])."""
    q_idx, k_idx, q, k, idx, sparse, topk, rows = _common(q_idx, k_idx, q, k, indices, causal)
    b, sq = q_idx.shape[:2]
    cfg = _config(q.shape[1] // k.shape[1], q.shape[3], q_idx.shape[2], q_idx.shape[3])
    lse = _lse(q, k, idx, sparse, topk, causal, scale, cfg, _flags(q.dtype, causal, sparse), 4)
    lse_i = torch.empty((b, sq), dtype=torch.float32, device=q.device)
    kl = torch.empty((b, sq), dtype=torch.float32, device=q.device)
    if kl.numel():
        _kl_launch(q_idx, k_idx, weights, q, k, idx, lse, lse_i, kl, kl, kl, kl, kl, sparse, topk, causal, scale,
                   index_scale, backward=False)
    return kl.sum() / rows, lse, lse_i


def indexer_kl_loss_backward(grad, q_idx, k_idx, weights, q, k, indices, lse, lse_i, *, scale, index_scale,
                             causal=True):
    """Launcher: (dq_idx, dk_idx, dweights) of loss * grad in their inputs' dtypes, from the forward's lse."""
    dtypes = (q_idx.dtype, k_idx.dtype, weights.dtype)
    q_idx, k_idx, q, k, idx, sparse, topk, rows = _common(q_idx, k_idx, q, k, indices, causal)
    g = (grad.float() / rows).reshape(1)
    dqi = torch.empty(q_idx.shape, dtype=torch.float32, device=q.device)
    dki = torch.zeros(k_idx.shape, dtype=torch.float32, device=q.device)
    dw = torch.empty(weights.shape, dtype=torch.float32, device=q.device)
    if dqi.numel():
        _kl_launch(q_idx, k_idx, weights, q, k, idx, lse.float().contiguous(), lse_i.float().contiguous(), g, g, dqi,
                   dki, dw, sparse, topk, causal, scale, index_scale, backward=True)
    return dqi.to(dtypes[0]), dki.to(dtypes[1]), dw.to(dtypes[2])


# ------------------------------------------------------------------------------------------------ AOT
UNIT_STRIDES = {"lse": ("stride_qd", "stride_kd"), "kl": ("stride_qid", "stride_kid", "stride_qd", "stride_kd")}
ALIGNED = {
    "lse": ("q_ptr", "k_ptr", "idx_ptr", "lse_ptr", "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh",
            "stride_kn"),
    "kl": ("qi_ptr", "ki_ptr", "w_ptr", "q_ptr", "k_ptr", "idx_ptr", "lse_ptr", "lse_i_ptr", "kl_ptr", "g_ptr",
           "dqi_ptr", "dki_ptr", "dw_ptr", "stride_qib", "stride_qim", "stride_qih", "stride_kib", "stride_kin",
           "stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn"),
}


def _signature(kind: str, dtype: torch.dtype) -> dict[str, str]:
    kernel = indexer_kl_lse_kernel if kind == "lse" else indexer_kl_kernel
    pointers = {"q_ptr": ptr(dtype), "k_ptr": ptr(dtype), "qi_ptr": ptr(dtype), "ki_ptr": ptr(dtype),
                "w_ptr": ptr(dtype), "idx_ptr": "*i32"}
    sig = {}
    for name in kernel.arg_names:
        if name in UNIT_STRIDES[kind]:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name in ("scale", "index_scale"):
            sig[name] = "fp32"
        elif not name.isupper() or name in ("SQ", "SK", "HI", "DI", "H", "GROUPS", "G_BLOCKS", "DQK", "TOPK"):
            sig[name] = "i32"
    return sig


def _spec(kind: str, dtype: torch.dtype, dqk: int, *, groups: int = 1, backward: bool = False, hi: int = 64,
          di: int = 128, sparse: bool = True, hot: bool = True) -> AOTSpec:
    cfg = _config(groups, dqk, hi, di)
    flags = dict(SPARSE=sparse, CAUSAL=True, UPCAST=False, PRECISION="tf32x3" if dtype == torch.float32 else None)
    if kind == "lse":
        constexprs = dict(BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=cfg["BLOCK_DQK"],
                          DQK_CHUNKS=cfg["DQK_CHUNKS"], **flags)
        name, warps = f"lse_{TRITON_DTYPE[dtype]}_g{cfg['BLOCK_G']}_dqk{dqk}", 4
    else:
        constexprs = dict(**cfg, BACKWARD=backward, **flags)
        name = f"{'bwd' if backward else 'fwd'}_{TRITON_DTYPE[dtype]}_h{hi}_di{di}_g{cfg['BLOCK_G']}_dqk{dqk}"
        warps = num_warps(cfg, backward)
    return AOTSpec(name=name + ("" if sparse else "_dense"),
                   kernel=indexer_kl_lse_kernel if kind == "lse" else indexer_kl_kernel,
                   signature=_signature(kind, dtype),
                   constexprs={**constexprs, **{n: 1 for n in UNIT_STRIDES[kind]}},
                   divisible_by_16=ALIGNED[kind], num_warps=warps, num_stages=num_stages(dtype), hot=hot)


def aot_specs() -> list[AOTSpec]:
    """V3.2's shapes: 64 index heads of 128; the target MLA's per-head keys of 192 (one q head per kv head)
    or 128, bf16, the sparse stage (the dense warm-up differs only in where the keys come from)."""
    return [
        _spec("lse", torch.bfloat16, 192),
        _spec("kl", torch.bfloat16, 192),
        _spec("kl", torch.bfloat16, 192, backward=True),
        _spec("kl", torch.bfloat16, 128, backward=True),
        # fp32 (tf32x3 dots) is not the fast path: it compiles within shared memory and spills (reported).
        _spec("kl", torch.float32, 192, backward=True, hot=False),
    ]
