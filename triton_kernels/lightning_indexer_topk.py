"""DeepSeek-V3.2 lightning indexer + streaming top-k in Triton.

score[b, i, j] = sum_h w[b, i, h] * relu(scale * q[b, i, h, :] . k[b, j, :]); per query row the top_k
visible keys, highest first. Neither [B, Sq, Hi, Sk] nor [B, Sq, Sk] ever exists: the running top-k lives
in registers.

One program owns BLOCK_M query rows of one (batch, group) (BLOCK_M = 1 for V3.2's 64 index heads). It walks
the visible keys (causal bound: nothing after the last row's position is loaded) in super-blocks of SB keys:
- scores of BLOCK_N keys at a time: one tl.dot of the q rows [BLOCK_M * HI_PAD, D] (the index heads are the
  dot's M) with the key tile [D, BLOCK_N], fp32 accumulate, relu, times the head weights, summed over heads;
- each score becomes an order-preserving int64 key: (monotone int32 of the fp32 score) << 32 | (2**31 - 1 -
  key index), so the largest key is the best score and, among equal scores, the lowest index; INT64_MIN marks
  "no key". The BLOCK_N keys are placed into the super-block buffer [BLOCK_M, SB] (a select; no indexing);
- merge, only when some key of the super-block beats the current top_k-th best (later blocks are cheap):
  the running best [BLOCK_M, KP] is kept sorted ascending; tl.topk gives the super-block's best KP sorted
  descending; their elementwise max holds the KP best of the union as a bitonic sequence (the bitonic top-k
  trick), and log2(KP) compare-exchange stages sort it again.
KP is the smallest of KP_CHOICES >= top_k; only the first top_k are stored (-1 for sentinels).

The same kernel serves topk_sparse_attention's selection: G independent "groups" (query heads, each with one
index head, unit weights, no relu) whose key tensor is shared by GROUPS consecutive groups (GQA).

Limits (declared in dsattn.capabilities): top_k <= 2048 (KP = 4096 needs twice the registers of the 2048
configs, which already take 8 warps); larger top_k go to the compiled radix select or the torch backend.
Offsets: 64-bit row and key-block bases, 32-bit offsets within a tile of BLOCK_M rows / BLOCK_N keys.
"""

import torch
import triton
import triton.language as tl

from dsattn import capabilities

from ._common import AOTSpec, TRITON_DTYPE, interpreting, launch, ptr

MAX_TOP_K = capabilities.of("lightning_indexer_topk")["triton"].max_top_k
KP_CHOICES = (16, 128, 512, MAX_TOP_K)  # running top-k widths (powers of two) the launcher compiles
assert MAX_TOP_K & (MAX_TOP_K - 1) == 0, "the widest running top-k is a power of two"
BLOCK_N = 64  # keys per tl.dot
MAX_BLOCK_D = 128  # head dim per tl.dot (larger D: several chunks)
MAX_SPLITS = 64  # decode split-K fan-out
MAX_HEADS_PER_DOT = 64  # index heads per tl.dot (more: several chunks)
ROW_KEYS = 2048  # BLOCK_M * KP bound (registers for the running top-k)
# Left to itself ptxas caps these kernels at 128 (8 warps) or 168 (4 warps) registers and spills the running
# top-k to a stack frame on sm_80 (and sm_90 for some); with the cap at the architecture's 255 it keeps it in
# registers (160-220 measured with the AOT compile).
MAXNREG = 255
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SENTINEL = tl.constexpr(-(2**63))  # "no key": below every packed score
TOP = tl.constexpr(2**63 - 1)


@triton.jit
def _indicator(NDIM: tl.constexpr, AXIS: tl.constexpr):
    """0/1 along AXIS of the hypercube view, broadcastable to it."""
    return tl.reshape(tl.arange(0, 2), [1] * AXIS + [2] + [1] * (NDIM - AXIS - 1))


@triton.jit
def _exchange(h, NDIM: tl.constexpr, AXIS: tl.constexpr, flip, MINMAX: tl.constexpr):
    """Compare-exchange across the size-2 AXIS of the hypercube h: the left element gets the min (the max
    where flip is 1, i.e. a descending run). The partner comes from an xor-reduction as in triton's own sort;
    under the interpreter min/max reductions instead (its generic reduce runs element by element)."""
    if MINMAX:
        lo = tl.min(h, AXIS, keep_dims=True)
        hi = tl.max(h, AXIS, keep_dims=True)
    else:
        partner = h ^ tl.xor_sum(h, AXIS, keep_dims=True)
        lo = tl.minimum(h, partner)
        hi = tl.maximum(h, partner)
    return tl.where((_indicator(NDIM, AXIS) ^ flip) == 1, hi, lo)


@triton.jit
def _bitonic_merge(h, NDIM: tl.constexpr, STAGES: tl.constexpr, flip, MINMAX: tl.constexpr):
    """Sort the bitonic runs of 2**STAGES elements (the last STAGES axes of h): bits STAGES-1 .. 0."""
    for j in tl.static_range(STAGES):
        h = _exchange(h, NDIM, NDIM - STAGES + j, flip, MINMAX)
    return h


@triton.jit
def _topk_descending(x, BLOCK_M: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr,
                     MINMAX: tl.constexpr):
    """The 2**LOG_K largest of each row of x [BLOCK_M, 2**LOG_N], sorted descending (bitonic sort of runs
    of 2**LOG_K with alternating directions, then halving: max of an ascending and a descending run is the
    top of both, merged again). tl.topk's algorithm, with _exchange."""
    NDIM: tl.constexpr = LOG_N + 1
    h = tl.reshape(x, [BLOCK_M] + [2] * LOG_N)
    for s in tl.static_range(1, LOG_K + 1):
        if s < LOG_N:
            h = _bitonic_merge(h, NDIM, s, _indicator(NDIM, NDIM - 1 - s), MINMAX)  # direction: bit s
        else:
            h = _bitonic_merge(h, NDIM, s, 1, MINMAX)
    for i in tl.static_range(LOG_N - LOG_K):  # NDIM - i - 1 dims after this halving
        h = tl.max(h, NDIM - i - 1 - LOG_K, keep_dims=False)  # the axis of bit LOG_K
        if i < LOG_N - LOG_K - 1:
            h = _bitonic_merge(h, NDIM - i - 1, LOG_K, _indicator(NDIM - i - 1, NDIM - i - 2 - LOG_K), MINMAX)
        else:
            h = _bitonic_merge(h, NDIM - i - 1, LOG_K, 1, MINMAX)
    return tl.reshape(h, [BLOCK_M, 2**LOG_K])


@triton.jit
def lightning_indexer_topk_kernel(
    q_ptr, k_ptr, w_ptr, out_ptr,
    stride_qb, stride_qg, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kg, stride_kn, stride_kd,
    stride_wb, stride_wg, stride_wm, stride_wh,
    NG, GROUPS, SQ, SK, HI, D, TOPK, M_BLOCKS, NUM_SPLITS, KEYS_PER_SPLIT,
    scale, last_key_shift,
    BLOCK_M: tl.constexpr, HI_PAD: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    KP: tl.constexpr, LOG_KP: tl.constexpr, SB: tl.constexpr, LOG_SB: tl.constexpr,
    RELU: tl.constexpr, UNIT_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    MINMAX: tl.constexpr, SPLIT: tl.constexpr,
):
    split = tl.program_id(0) % NUM_SPLITS
    m_block = M_BLOCKS - 1 - tl.program_id(0) // NUM_SPLITS  # latest (most keys under causal) rows start first
    bg = tl.program_id(1)
    g = bg % NG
    b64 = (bg // NG).to(tl.int64)
    g64 = g.to(tl.int64)
    kv64 = (g // GROUPS).to(tl.int64)

    row0 = m_block * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_mask = offs_m < SQ
    row_last = offs_m + last_key_shift  # last visible key per row (causal), or >= SK
    n_keys = tl.minimum(SK, tl.minimum(row0 + BLOCK_M - 1, SQ - 1) + last_key_shift + 1)
    key_lo = split * KEYS_PER_SPLIT  # this program's share of the keys (decode split-K)
    key_hi = tl.minimum(n_keys, key_lo + KEYS_PER_SPLIT)

    # Dot rows: r = m * HI_PAD + h (a head chunk of HI_PAD heads per dot).
    offs_r = tl.arange(0, BLOCK_M * HI_PAD)
    r_local = offs_r // HI_PAD
    r_m = row0 + r_local
    r_h = offs_r % HI_PAD
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    # 64-bit row bases (scalars), 32-bit offsets within a tile: a [B, S, H, D] view's row stride H x D times
    # S passes 2^31 at real sizes (topk_sparse_attention's selection at S=128k with 128 heads of 192).
    q_base = q_ptr + b64 * stride_qb + g64 * stride_qg + tl.cast(row0, tl.int64) * stride_qm
    k_base = k_ptr + b64 * stride_kb + kv64 * stride_kg
    w_base = w_ptr + b64 * stride_wb + g64 * stride_wg + tl.cast(row0, tl.int64) * stride_wm
    if HEAD_CHUNKS * D_CHUNKS == 1:  # the whole q tile stays in registers across the key loop
        q_tile = tl.load(q_base + r_local[:, None] * stride_qm + r_h[:, None] * stride_qh
                         + offs_d[None, :] * stride_qd,
                         mask=((r_m < SQ) & (r_h < HI))[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong
            q_tile = q_tile.to(tl.float32)
        if not UNIT_WEIGHTS:
            w_tile = tl.load(w_base + r_local * stride_wm + r_h * stride_wh, mask=(r_m < SQ) & (r_h < HI),
                             other=0.0)
            w_tile = w_tile.to(tl.float32)

    piece_ids = tl.arange(0, SB // BLOCK_N)
    kp_ids = tl.arange(0, KP)
    best = tl.full([BLOCK_M, KP], SENTINEL, dtype=tl.int64)  # ascending: best[:, KP - 1] is the top
    threshold = tl.full([BLOCK_M], SENTINEL, dtype=tl.int64)  # the top_k-th best so far
    for start in range(key_lo, key_hi, SB):
        block = tl.full([BLOCK_M, SB // BLOCK_N, BLOCK_N], SENTINEL, dtype=tl.int64)
        n_pieces = tl.minimum(SB // BLOCK_N, tl.cdiv(key_hi - start, BLOCK_N))
        for p in range(0, n_pieces):
            keys = start + p * BLOCK_N + offs_n
            key_mask = keys < key_hi
            k_block = k_base + tl.cast(start + p * BLOCK_N, tl.int64) * stride_kn
            score = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for hc in tl.static_range(HEAD_CHUNKS):
                heads = hc * HI_PAD + r_h
                acc = tl.zeros([BLOCK_M * HI_PAD, BLOCK_N], dtype=tl.float32)
                for dc in tl.static_range(D_CHUNKS):
                    d = dc * BLOCK_D + offs_d
                    if HEAD_CHUNKS * D_CHUNKS == 1:
                        q_chunk = q_tile
                    else:
                        q_chunk = tl.load(
                            q_base + r_local[:, None] * stride_qm + heads[:, None] * stride_qh
                            + d[None, :] * stride_qd,
                            mask=((r_m < SQ) & (heads < HI))[:, None] & (d < D)[None, :], other=0.0)
                        if UPCAST:
                            q_chunk = q_chunk.to(tl.float32)
                    k_chunk = tl.load(k_block + offs_n[None, :] * stride_kn + d[:, None] * stride_kd,
                                      mask=key_mask[None, :] & (d < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
                    if UPCAST:
                        k_chunk = k_chunk.to(tl.float32)
                    if IEEE:  # fp32 inputs: no tf32 rounding in the ranking
                        acc = tl.dot(q_chunk, k_chunk, acc, input_precision="ieee", out_dtype=tl.float32)
                    else:
                        acc = tl.dot(q_chunk, k_chunk, acc, out_dtype=tl.float32)
                acc = acc * scale
                if RELU:
                    acc = tl.maximum(acc, 0.0)
                if UNIT_WEIGHTS:
                    acc = tl.where(((r_m < SQ) & (heads < HI))[:, None], acc, 0.0)
                else:
                    if HEAD_CHUNKS * D_CHUNKS == 1:
                        w_chunk = w_tile
                    else:
                        w_chunk = tl.load(w_base + r_local * stride_wm + heads * stride_wh,
                                          mask=(r_m < SQ) & (heads < HI), other=0.0).to(tl.float32)
                    acc = acc * w_chunk[:, None]
                score += tl.sum(tl.reshape(acc, [BLOCK_M, HI_PAD, BLOCK_N]), axis=1)
            # Pack: monotone int32 of the score (high word), lower index wins ties (low word).
            score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0: equal scores, equal high words
            bits = score.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            packed = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - keys).to(tl.int64)[None, :]
            visible = (keys[None, :] <= row_last[:, None]) & key_mask[None, :] & row_mask[:, None]
            packed = tl.where(visible, packed, SENTINEL)
            block = tl.where((piece_ids == p)[None, :, None], packed[:, None, :], block)
        block = tl.reshape(block, [BLOCK_M, SB])
        improves = tl.sum(tl.sum((block > threshold[:, None]).to(tl.int32), axis=1), axis=0)
        if improves > 0:
            top = _topk_descending(block, BLOCK_M, LOG_SB, LOG_KP, MINMAX)  # [BLOCK_M, KP]
            # best ascending, top descending: their max is the KP best of both, a bitonic run.
            h = tl.reshape(tl.maximum(best, top), [BLOCK_M] + [2] * LOG_KP)
            best = tl.reshape(_bitonic_merge(h, LOG_KP + 1, LOG_KP, 0, MINMAX), [BLOCK_M, KP])
            threshold = tl.min(tl.where((kp_ids >= KP - TOPK)[None, :], best, TOP), axis=1)

    # Column c of the output is best[:, KP - 1 - c].
    cols = KP - 1 - kp_ids
    out_rows = (b64 * NG + g64) * SQ + offs_m
    if SPLIT:  # packed keys of this split, all KP of them: the launcher merges the splits
        ws_rows = out_rows * NUM_SPLITS + split
        tl.store(out_ptr + ws_rows[:, None] * KP + cols[None, :], best, mask=row_mask[:, None])
    else:
        index = tl.where(best == SENTINEL, -1, 0x7FFFFFFF - best.to(tl.int32))  # sentinels -> -1
        tl.store(out_ptr + out_rows[:, None] * TOPK + cols[None, :], index,
                 mask=row_mask[:, None] & (cols < TOPK)[None, :])


# ------------------------------------------------------------------------------------------- launcher
def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def kp_for(top_k: int) -> int:
    return next(kp for kp in KP_CHOICES if kp >= top_k)


def block_config(heads: int, dim: int, top_k: int) -> dict:
    """Tile sizes and warps for `heads` index heads of dim `dim` (topk_sparse_attention: 1 head).
    BLOCK_M query rows share each key tile; the dot needs >= 16 rows, so few heads take more rows (capped by
    ROW_KEYS, the running top-k's register budget) and pad the rest."""
    kp = kp_for(top_k)
    hi_pad = min(_next_pow2(heads), MAX_HEADS_PER_DOT)
    block_m = max(1, min(16 // hi_pad, ROW_KEYS // kp))
    hi_pad = max(hi_pad, 16 // block_m)
    block_d = min(max(_next_pow2(dim), 16), MAX_BLOCK_D)
    sb = max(kp, BLOCK_N)
    num_warps = 8 if block_m * kp >= 1024 or block_m * hi_pad >= 64 else 4
    return dict(BLOCK_M=block_m, HI_PAD=hi_pad, HEAD_CHUNKS=triton.cdiv(heads, hi_pad), BLOCK_N=BLOCK_N,
                BLOCK_D=block_d, D_CHUNKS=triton.cdiv(dim, block_d), KP=kp, LOG_KP=kp.bit_length() - 1, SB=sb,
                LOG_SB=sb.bit_length() - 1,
                num_warps=num_warps)


def num_stages(kp: int, dtype: torch.dtype) -> int:
    """Pipelined key loads (two stages: no spill in 16 bits at any KP on sm_80 / sm_90), except fp32 at KP 2048,
    where the running top-k and the fp32 key tiles already fill the registers (two stages spill there)."""
    return 1 if kp >= 2048 and dtype == torch.float32 else 2


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(programs: int, keys: int, sb: int, device: torch.device) -> int:
    """Split the keys only when the row programs alone leave SMs idle (decode, short prefill): aim at ~2
    waves, at least one super-block per split, at most MAX_SPLITS."""
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(keys, sb), triton.cdiv(2 * sms, programs)))


def decode_packed(keys: torch.Tensor) -> torch.Tensor:
    """Packed int64 keys -> int32 key indices, -1 for the sentinel (the kernel's decode, in torch)."""
    index = 0x7FFFFFFF - (keys & 0xFFFFFFFF)
    return torch.where(keys == -(2**63), -1, index).to(torch.int32)


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor | None,
    top_k: int,
    *,
    scale: float,
    causal: bool,
    relu: bool = True,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher (inputs validated by the op). q [B, G, Sq, Hi, D], k [B, Gk, Sk, D] with G % Gk == 0,
    weights [B, G, Sq, Hi] or None (unit weights); any strides. Returns int32 [B, G, Sq, top_k]
    (`out`, contiguous, may be given: tests poison it). top_k <= MAX_TOP_K. `splits` overrides the decode
    split-K heuristic: each split streams a share of the keys into packed int64 partial lists
    [B, G, Sq, splits, KP] (O(rows x splits x KP); only used when rows are few), merged by one torch.topk."""
    b, ng, sq, hi, d = q.shape
    ngk, sk = k.shape[1], k.shape[2]
    if top_k > MAX_TOP_K:
        raise ValueError(f"lightning_indexer Triton kernel: top_k <= {MAX_TOP_K}, got {top_k}")
    if k.dtype != q.dtype:
        common = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(common), k.to(common)
    if out is None:
        out = torch.empty((b, ng, sq, top_k), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.fill_(-1)
    if weights is None:
        w, w_strides = q, (0, 0, 0, 0)  # never read
    else:
        w = weights if weights.dtype == torch.float32 else weights.float()
        w_strides = w.stride()
    cfg = block_config(hi, d, top_k)
    num_warps = cfg.pop("num_warps")
    # The kernel's offsets are int32 within a tile (BLOCK_M rows, BLOCK_N keys), 64-bit between tiles.
    tiles = {"q_idx": q[0, 0, : cfg["BLOCK_M"]], "k_idx": k[0, 0, :BLOCK_N]}
    if weights is not None:
        tiles["weights"] = w[0, 0, : cfg["BLOCK_M"]]
    for name, t in tiles.items():
        if capabilities.max_offset(t) > capabilities.INT32_OFFSETS:
            raise ValueError(f"dsattn.lightning_indexer_topk: a tile of {name} spans more than 2^31 elements "
                             f"(strides {tuple(t.stride())})")
    m_blocks = triton.cdiv(sq, cfg["BLOCK_M"])
    keys = min(sk, sk - sq + cfg["BLOCK_M"]) if causal else sk  # the first row block's (the fewest) keys
    if splits is None:
        splits = num_splits(m_blocks * b * ng, max(1, keys), cfg["SB"], q.device)
    keys_per_split = triton.cdiv(triton.cdiv(sk, max(1, splits)), cfg["SB"]) * cfg["SB"]
    splits = triton.cdiv(sk, keys_per_split)
    target = out
    if splits > 1:
        target = torch.empty((b, ng, sq, splits, cfg["KP"]), dtype=torch.int64, device=q.device)
    launch(lightning_indexer_topk_kernel)[(m_blocks * splits, b * ng)](
        q, k, w, target,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), q.stride(4),
        *k.stride(), *w_strides,
        ng, ng // ngk, sq, sk, hi, d, top_k, m_blocks, splits, keys_per_split,
        float(scale), (sk - sq) if causal else sk,
        RELU=relu, UNIT_WEIGHTS=weights is None, SPLIT=splits > 1,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32,
        MINMAX=interpreting(),
        num_warps=num_warps, num_stages=num_stages(cfg["KP"], q.dtype), maxnreg=MAXNREG, **cfg,
    )
    if splits > 1:  # a split whose keys are all after the row's position contributes only sentinels
        merged = target.view(b, ng, sq, splits * cfg["KP"]).topk(top_k, dim=-1).values
        out.copy_(decode_packed(merged))
    return out


# ------------------------------------------------------------------------------------------------ AOT
UNIT_STRIDES = ("stride_qd", "stride_kd")
ALIGNED = ("q_ptr", "k_ptr", "w_ptr", "out_ptr", "stride_qb", "stride_qg", "stride_qm", "stride_qh",
           "stride_kb", "stride_kg", "stride_kn", "KEYS_PER_SPLIT", "D")  # D: the JIT specializes multiples of 16


def _signature(dtype: torch.dtype, split: bool) -> dict[str, str]:
    sig = {"q_ptr": ptr(dtype), "k_ptr": ptr(dtype), "w_ptr": "*fp32", "out_ptr": "*i64" if split else "*i32"}
    for name in ("stride_qb", "stride_qg", "stride_qm", "stride_qh", "stride_qd", "stride_kb", "stride_kg",
                 "stride_kn", "stride_kd", "stride_wb", "stride_wg", "stride_wm", "stride_wh",
                 "NG", "GROUPS", "SQ", "SK", "HI", "D", "TOPK", "M_BLOCKS", "NUM_SPLITS", "KEYS_PER_SPLIT"):
        sig[name] = "i32"
    sig["scale"] = "fp32"
    sig["last_key_shift"] = "i32"
    for name in UNIT_STRIDES:
        sig[name] = "constexpr"
    return sig


def _spec(dtype, kind, heads, dim, kp, split, hot) -> AOTSpec:
    relu = kind == "indexer"
    cfg = block_config(heads, dim, kp)
    num_warps = cfg.pop("num_warps")
    label = f"indexer_h{heads}" if relu else "select"
    return AOTSpec(
        name=f"{label}_{TRITON_DTYPE[dtype]}_d{dim}_kp{kp}{'_split' if split else ''}",
        kernel=lightning_indexer_topk_kernel,
        signature=_signature(dtype, split),
        constexprs={**cfg, "RELU": relu, "UNIT_WEIGHTS": not relu, "UPCAST": False,
                    "IEEE": dtype == torch.float32, "MINMAX": False, "SPLIT": split,
                    **{name: 1 for name in UNIT_STRIDES}},
        divisible_by_16=ALIGNED,
        num_warps=num_warps,
        num_stages=num_stages(kp, dtype),
        maxnreg=MAXNREG,
        hot=hot,
    )


def aot_specs() -> list[AOTSpec]:
    """Every KP (the running top-k width: what sets registers), whole rows and decode splits, for
    - the indexer at V3.2's shape (64 index heads of dim 128; fp16/bf16), dim 64, and 16 heads (small models:
      one query row per dot instead of the padded 16);
    - topk_sparse_attention's selection (one unit-weight head per query head, no relu) at head dims 64, 128
      and MLA's 192 (two D chunks, q reloaded per key block), bf16, and fp16 at 128;
    - fp32 (ieee dots; not the fast path, may spill) at dim 128.
    Other head counts and dims change only the padding of the dot rows / D chunks. The list is kept to what
    differs in code or registers: CI compiles each for sm_80 and sm_90 twice (two Triton versions)."""
    half = (torch.float16, torch.bfloat16)
    specs = []
    for kp in KP_CHOICES:
        for split in (False, True):
            specs += [_spec(dtype, "indexer", 64, 128, kp, split, True) for dtype in half]
            specs += [_spec(torch.bfloat16, "select", 1, dim, kp, split, True) for dim in (64, 128, 192)]
            specs.append(_spec(torch.float16, "select", 1, 128, kp, split, True))
        specs.append(_spec(torch.bfloat16, "indexer", 64, 64, kp, False, True))
        specs.append(_spec(torch.bfloat16, "indexer", 16, 128, kp, False, True))
        specs += [_spec(torch.float32, kind, heads, 128, kp, False, False) for kind, heads in (("indexer", 64), ("select", 1))]
    return specs
