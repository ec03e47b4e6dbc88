"""Paged sliding-window attention (flash-decoding split-K) for dsattn.paged_sliding_window_attention.

Packed query rows (decode rows and prefill chunks alike, as transformers' continuous batching mixes them) read
K/V in place through the block table, as FlashAttention's flash_attn_with_kvcache(block_table=) and vLLM's
paged attention do: no gather of the cache.

- `paged_sliding_window_attention_kernel`: one program per (row tile, KV head (and head chunk), key split).
  A row tile holds all query heads of the KV group (GQA) for BLOCK_Q consecutive queries of one sequence
  (rows ordered query-major, so a tile's windows overlap); tiles are numbered over the packed queries as
  cu_seqlens_q[s] // BLOCK_Q + s for sequence s (vLLM's unified-attention numbering: no host read of the
  offsets), and a program finds its sequence by binary search. Its keys are only those the tile's windows
  reach, [first query's position - window + 1, last query's position], cut into splits; each key tile's pages
  come from the block table, so blocks wholly outside every row's window are never read. Online softmax in
  base 2. With one split (DIRECT) it writes the output (sinks joined) itself; otherwise it writes normalized
  partials and their log-sum-exp, which the sliding-window decode combine kernel merges with the sink.
- `paged_latent_attention_kernel`: the same schedule for head dims over 256, i.e. DeepSeek MLA's latent pages
  read in place (one KV head, keys [c_kv | k_pe] of 512 + 64 columns, values a column view of the first 512,
  16..128 query heads sharing it, as FlashMLA's decode): a row tile is a block of query heads of one or a few
  queries, each key tile is loaded once for all of them, and q/k are split in two column chunks (512 + 64) with a
  dot each, so that registers hold no 1024-wide padded head. When the values are the view of the keys' first
  512 columns (the launcher checks the pointers and strides), the kernel takes them from the loaded first key
  chunk, as FlashMLA does (V = K[:, :512]): each latent row is read once. For head dims up to 256 the first
  kernel's tile is already this schedule (its row tile holds up to 64 heads of the group), so it stays.
Visibility is the op's: query i of a sequence with Sq queries and Sk keys sits at p = i + Sk - Sq and sees
p - window < j <= p. A NaN/Inf in a key or value a row does not see never reaches it (masked loads outside
the tile's key range; a non-finite value row inside it enters the dot zeroed). Page bases are 64-bit.
"""

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, interpreting, launch, ptr
from .sliding_window_attention import (
    LOG2E,
    MAX_HEAD_DIM,
    MAX_SPLITS,
    _aligned,
    _finish_rows,
    _num_splits,
    _online_softmax_step,
    _pow2,
    _unit_head_strides,
    check_head_dims,
    decode_config,
    decode_row_tiles,
    sliding_window_attention_decode_combine_kernel,
)


@triton.jit
def _sequence_of_tile(cu_seqlens_q_ptr, tile, NUM_SEQS, BLOCK_Q):
    """The sequence whose row tiles hold `tile`: sequence s's tiles start at cu_seqlens_q[s] // BLOCK_Q + s (a
    strictly increasing start, so the last sequence starting at or before `tile` owns it)."""
    lo = 0
    hi = NUM_SEQS
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _row_tile(cu_seqlens_q_ptr, seqlens_k_ptr, tile, pid_h, split, NUM_SEQS, GROUPS, HEADS_PER_TILE, BLOCK_Q,
              window, keys_per_split, BLOCK_M: tl.constexpr):
    """A program's rows (BLOCK_Q queries x HEADS_PER_TILE heads of one KV group, query-major) and the key range
    [lo, hi) of its split: (kv_head, seq, pos, head, token, row_valid, lo, hi)."""
    head_chunks = tl.cdiv(GROUPS, HEADS_PER_TILE)
    kv_head = pid_h // head_chunks
    seq = _sequence_of_tile(cu_seqlens_q_ptr, tile, NUM_SEQS, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    seqlen_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seqlen_k = tl.load(seqlens_k_ptr + seq)
    q_first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # the tile's first query within its sequence

    rows = tl.arange(0, BLOCK_M)
    qi = q_first + rows // HEADS_PER_TILE
    group = (pid_h % head_chunks) * HEADS_PER_TILE + rows % HEADS_PER_TILE
    row_valid = (rows < BLOCK_Q * HEADS_PER_TILE) & (group < GROUPS) & (qi < seqlen_q)
    head = kv_head * GROUPS + group
    token = (q_start + qi).to(tl.int64)
    shift = seqlen_k - seqlen_q
    pos = qi + shift
    # Keys the tile's windows reach, then this split's share of them.
    lo = tl.maximum(q_first + shift - window + 1, 0) + split * keys_per_split
    hi = tl.minimum(tl.minimum(q_first + BLOCK_Q, seqlen_q) + shift, lo + keys_per_split)
    hi = tl.where(q_first < seqlen_q, hi, lo)  # tiles past the sequence's queries are idle
    return kv_head, seq, pos, head, token, row_valid, lo, hi


@triton.jit
def _store_rows(acc, l_i, m_i, head, token, row_valid, o_ptr, o_part_ptr, lse_part_ptr, sinks_ptr, stride_ot,
                stride_oh, stride_od, TOTAL_Q, DV, NUM_SPLITS, split, HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """DIRECT: the rows' outputs (sinks joined); else their normalized partials and base-2 log-sum-exp."""
    offs_dv = tl.arange(0, BLOCK_DV)
    if DIRECT:
        sink_log2 = 0.0
        if HAS_SINKS:
            sink_log2 = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        out = _finish_rows(acc, l_i, m_i, sink_log2, HAS_SINKS)
        tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_dv[None, :] < DV))
    else:
        has_key = l_i > 0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        part_row = (head.to(tl.int64) * TOTAL_Q + token) * NUM_SPLITS + split
        tl.store(o_part_ptr + part_row[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=row_valid[:, None])
        tl.store(lse_part_ptr + part_row, lse, mask=row_valid)


@triton.jit
def paged_sliding_window_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, cu_seqlens_q_ptr, seqlens_k_ptr, o_ptr, o_part_ptr, lse_part_ptr,
    sinks_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    table_row_stride, NUM_SEQS, TOTAL_Q, GROUPS, HEADS_PER_TILE, BLOCK_Q, PAGE_SIZE, DQK, DV, window,
    qk_scale_log2, keys_per_split, NUM_SPLITS,
    HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, TF32X3: tl.constexpr,
):
    """DIRECT: out [TOTAL_Q, HQ, DV] (q's dtype, any strides) written here. Else partials o_part [HQ, TOTAL_Q,
    NUM_SPLITS, BLOCK_DV] (normalized) and lse_part [HQ, TOTAL_Q, NUM_SPLITS] (base 2, -inf for a split that
    saw nothing), fp32 and contiguous: the decode combine kernel's layout with one batch of TOTAL_Q rows."""
    split = tl.program_id(2)
    kv_head, seq, pos, head, token, row_valid, lo, hi = _row_tile(
        cu_seqlens_q_ptr, seqlens_k_ptr, tl.program_id(0), tl.program_id(1), split, NUM_SEQS, GROUPS,
        HEADS_PER_TILE, BLOCK_Q, window, keys_per_split, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_dqk[None, :] * stride_qd,
                mask=row_valid[:, None] & (offs_dqk[None, :] < DQK), other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
        q = q.to(tl.float32)

    table_row = block_table_ptr + seq.to(tl.int64) * table_row_stride
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        page = tl.load(table_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        slot = cols % PAGE_SIZE
        k = tl.load(k_base + page[None, :] * stride_kb + slot[None, :] * stride_ks + offs_dqk[:, None] * stride_kd,
                    mask=col_ok[None, :] & (offs_dqk[:, None] < DQK), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if TF32X3:
            s = tl.dot(q, k, input_precision="tf32x3", out_dtype=tl.float32)
        else:
            s = tl.dot(q, k, out_dtype=tl.float32)
        visible = row_valid[:, None] & col_ok[None, :] & (cols[None, :] > pos[:, None] - window) \
            & (cols[None, :] <= pos[:, None])
        s = tl.where(visible, s * qk_scale_log2, float("-inf"))
        v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_dv[None, :] * stride_vd
        # Masked step: a prefill tile's later rows see keys its earlier rows do not.
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v_ptrs, col_ok[:, None] & (offs_dv[None, :] < DV),
                                             visible, True, UPCAST, TF32X3)
    _store_rows(acc, l_i, m_i, head, token, row_valid, o_ptr, o_part_ptr, lse_part_ptr, sinks_ptr, stride_ot,
                stride_oh, stride_od, TOTAL_Q, DV, NUM_SPLITS, split, HAS_SINKS, DIRECT, BLOCK_DV)


@triton.jit
def paged_latent_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, cu_seqlens_q_ptr, seqlens_k_ptr, o_ptr, o_part_ptr, lse_part_ptr,
    sinks_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    table_row_stride, NUM_SEQS, TOTAL_Q, GROUPS, HEADS_PER_TILE, BLOCK_Q, PAGE_SIZE, DQK, DV, window,
    qk_scale_log2, keys_per_split, NUM_SPLITS,
    HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
    TF32X3: tl.constexpr, V_IS_K_PREFIX: tl.constexpr,
):
    """The paged kernel for head dims over 256 (MLA's latent pages: Dqk = kv_lora_rank + rope, e.g. 512 + 64, one
    KV head shared by every query head). Same rows, key ranges and outputs as paged_sliding_window_attention_kernel;
    q/k split in two column chunks, [0, BLOCK_DA) (the latent part) and [BLOCK_DA, BLOCK_DA + BLOCK_DB) (the
    rope part), each its own dot, so that no padded power of two of Dqk (1024 for 576) is held. Each key tile is
    loaded once for all the tile's query heads. V_IS_K_PREFIX (the launcher's check: v is the view of k's first
    DV = BLOCK_DA columns, MLA's latent pages): the values are the loaded first key chunk, as FlashMLA does, so
    each latent row is read once; else they are read through their own strides."""
    split = tl.program_id(2)
    kv_head, seq, pos, head, token, row_valid, lo, hi = _row_tile(
        cu_seqlens_q_ptr, seqlens_k_ptr, tl.program_id(0), tl.program_id(1), split, NUM_SEQS, GROUPS,
        HEADS_PER_TILE, BLOCK_Q, window, keys_per_split, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_DA)
    offs_b = BLOCK_DA + tl.arange(0, BLOCK_DB)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh
    q_a = tl.load(q_rows + offs_a[None, :] * stride_qd, mask=row_valid[:, None] & (offs_a[None, :] < DQK), other=0.0)
    q_b = tl.load(q_rows + offs_b[None, :] * stride_qd, mask=row_valid[:, None] & (offs_b[None, :] < DQK), other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands
        q_a = q_a.to(tl.float32)
        q_b = q_b.to(tl.float32)

    table_row = block_table_ptr + seq.to(tl.int64) * table_row_stride
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        page = tl.load(table_row + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        slot = cols % PAGE_SIZE
        k_cols = k_base + page[None, :] * stride_kb + slot[None, :] * stride_ks
        k_a = tl.load(k_cols + offs_a[:, None] * stride_kd, mask=col_ok[None, :] & (offs_a[:, None] < DQK), other=0.0)
        k_b = tl.load(k_cols + offs_b[:, None] * stride_kd, mask=col_ok[None, :] & (offs_b[:, None] < DQK), other=0.0)
        if UPCAST:
            k_a = k_a.to(tl.float32)
            k_b = k_b.to(tl.float32)
        if TF32X3:
            s = tl.dot(q_a, k_a, input_precision="tf32x3", out_dtype=tl.float32)
            s = tl.dot(q_b, k_b, s, input_precision="tf32x3", out_dtype=tl.float32)
        else:
            s = tl.dot(q_a, k_a, out_dtype=tl.float32)
            s = tl.dot(q_b, k_b, s, out_dtype=tl.float32)
        visible = row_valid[:, None] & col_ok[None, :] & (cols[None, :] > pos[:, None] - window) \
            & (cols[None, :] <= pos[:, None])
        s = tl.where(visible, s * qk_scale_log2, float("-inf"))
        if V_IS_K_PREFIX:  # k_a's rows past the tile's keys loaded as zeros, as a value load would
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, tl.trans(k_a), None, visible, True, UPCAST, TF32X3,
                                                 V_LOADED=True)
        else:
            v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vs + offs_dv[None, :] * stride_vd
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v_ptrs,
                                                 col_ok[:, None] & (offs_dv[None, :] < DV), visible, True, UPCAST,
                                                 TF32X3)
    _store_rows(acc, l_i, m_i, head, token, row_valid, o_ptr, o_part_ptr, lse_part_ptr, sinks_ptr, stride_ot,
                stride_oh, stride_od, TOTAL_Q, DV, NUM_SPLITS, split, HAS_SINKS, DIRECT, BLOCK_DV)


# ----------------------------------------------------------------------------------------- launcher
def config(rows: int, block_dqk: int, block_dv: int, dtype: torch.dtype) -> dict:
    """The sliding-window decode tiles: a 16-row tile while a KV group's rows (groups x longest query count)
    fit in it, else 64 rows (16 in fp32, whose 64-row tile spills)."""
    return decode_config(min(rows, decode_row_tiles(dtype)[-1]), block_dqk, block_dv, dtype)


LATENT_ROW_TILES = (16, 32)
LATENT_MAX_SPLITS = 16  # the combine kernel holds splits x BLOCK_DV (512) partials of a row


def latent_config(rows: int, dtype: torch.dtype) -> dict:
    """The latent kernel's tiles: rows of (query, head) pairs, 16 while a KV group's rows fit, else 32 (with 512-wide
    fp32 accumulators a 64-row tile spills, as does the 16-row tile on 4 warps); 8 warps, 32-key tiles, 2 stages
    (K's 576 columns per stage in shared memory, and V's 512 unless they are K's first 512). fp32 (tf32x3 dots,
    twice the bytes) keeps 16 x 16 tiles in one stage."""
    if dtype == torch.float32:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    block_m = LATENT_ROW_TILES[0] if rows <= LATENT_ROW_TILES[0] else LATENT_ROW_TILES[1]
    return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=8, num_stages=2)


def latent_chunks(dqk: int) -> tuple[int, int]:
    """(BLOCK_DA, BLOCK_DB): q/k column chunks covering dqk, the first the largest power of two below it (at most
    512), the second the rest padded to a power of two: 576 -> 512 + 64 (MLA's latent + rope), 288 -> 256 + 32."""
    block_da = min(512, 1 << ((dqk - 1).bit_length() - 1)) if dqk > 16 else 16
    return block_da, _pow2(max(1, dqk - block_da))


LATENT_MAX_DV = 512  # value columns per launch of the latent kernel (its fp32 accumulator tile)


def _check_head_dims(dqk: int, dv: int) -> None:
    from dsattn.capabilities import CAPABILITIES

    cap = CAPABILITIES["paged_sliding_window_attention"]["triton"].max_head_dim
    if dqk > cap or dv > cap:
        raise ValueError(f"dsattn.paged_sliding_window_attention: the Triton kernels take head dims up to {cap} "
                         f"(got q/k {dqk}, v {dv}); use backend='torch'")


def values_are_key_prefix(k_cache, v_cache, block_da: int) -> bool:
    """v_cache is the view of k_cache's first block_da columns (MLA's latent pages: the same storage, start and
    block/token/head/column strides), so the latent kernel may take the values from its first key chunk."""
    return (v_cache.shape[3] == block_da and v_cache.dtype == k_cache.dtype and v_cache.stride() == k_cache.stride()
            and v_cache.shape[:3] == k_cache.shape[:3] and v_cache.data_ptr() == k_cache.data_ptr()
            and v_cache.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr())


def paged_sliding_window_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, max_seqlen_q, window,
                                   scale, sinks, num_splits=None, out=None):
    """q [total_q, Hq, Dqk] (any strides), k_cache [num_blocks, page, Hkv, Dqk], v_cache [.., Dv] (any strides,
    e.g. a column view of k_cache), block_table int32 [num_seqs, max_blocks], cu_seqlens_q int32 [num_seqs + 1],
    seqlens_k int32 [num_seqs] (validated by the op) -> [total_q, Hq, Dv]. sinks: fp32 [Hq] or None. num_splits:
    key splits per row tile (default: enough programs for the device, from the key range bound
    min(window + BLOCK_Q - 1, max_blocks x page): no host read of the offsets). out: optional [total_q, Hq, Dv]
    buffer (q's dtype, any strides) every element of which is written. Head dims up to 256 take
    paged_sliding_window_attention_kernel, wider ones (MLA's latent pages) paged_latent_attention_kernel."""
    total_q, hq, dqk = q.shape
    page, hkv, dv = v_cache.shape[1], v_cache.shape[2], v_cache.shape[3]
    latent = dqk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM
    if latent:
        _check_head_dims(dqk, dv)
    else:
        check_head_dims(dqk, dv)
    if out is None:
        out = torch.empty(total_q, hq, dv, dtype=q.dtype, device=q.device)
    if latent and dv > LATENT_MAX_DV:
        # Wider values (no model's): one launch per column slice of them, each the same softmax over its slice.
        for c in range(0, dv, LATENT_MAX_DV):
            paged_sliding_window_attention(q, k_cache, v_cache[..., c:c + LATENT_MAX_DV], block_table, cu_seqlens_q,
                                           seqlens_k, max_seqlen_q, window, scale, sinks, num_splits,
                                           out[..., c:c + LATENT_MAX_DV])
        return out
    num_seqs = seqlens_k.shape[0]
    if out.numel() == 0:
        return out
    if num_seqs == 0 or max_seqlen_q == 0 or block_table.shape[1] == 0:
        return out.zero_()
    groups = hq // hkv
    block_dqk, block_dv = _pow2(dqk), _pow2(dv)
    if latent:
        cfg = latent_config(groups * max_seqlen_q, q.dtype)
        kernel, max_splits = paged_latent_attention_kernel, LATENT_MAX_SPLITS
        block_da, block_db = latent_chunks(dqk)
        head_dims = dict(BLOCK_DA=block_da, BLOCK_DB=block_db,
                         V_IS_K_PREFIX=values_are_key_prefix(k_cache, v_cache, block_da))
    else:
        cfg = config(groups * max_seqlen_q, block_dqk, block_dv, q.dtype)
        kernel, max_splits = paged_sliding_window_attention_kernel, MAX_SPLITS
        head_dims = dict(BLOCK_DQK=block_dqk)
    heads_per_tile = min(groups, cfg["BLOCK_M"])
    head_chunks = triton.cdiv(groups, heads_per_tile)
    block_q = cfg["BLOCK_M"] // heads_per_tile
    tiles = total_q // block_q + num_seqs
    window = min(window, 2**30)  # keeps int32 arithmetic in range; larger windows see the same keys
    keys = max(1, min(window + min(block_q, max_seqlen_q) - 1, block_table.shape[1] * page))
    if num_splits is None:
        num_splits = _num_splits(keys, hkv * head_chunks * max(triton.cdiv(total_q, block_q), min(num_seqs, total_q)),
                                 q.device)
    num_splits = max(1, min(num_splits, max_splits))
    keys_per_split = triton.cdiv(triton.cdiv(keys, num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    num_splits = triton.cdiv(keys, keys_per_split)
    direct = num_splits == 1
    o_part = lse_part = None
    if not direct:
        o_part = torch.empty(hq, total_q, num_splits, block_dv, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(hq, total_q, num_splits, dtype=torch.float32, device=q.device)
    block_table, cu_seqlens_q, seqlens_k = block_table.contiguous(), cu_seqlens_q.contiguous(), seqlens_k.contiguous()
    launch(kernel)[(tiles, hkv * head_chunks, num_splits)](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seqlens_k, out if direct else None, o_part, lse_part,
        sinks if direct else None, *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_table.stride(0), num_seqs, total_q, groups, heads_per_tile, block_q, page, dqk, dv, window,
        scale * LOG2E, keys_per_split, num_splits,
        HAS_SINKS=direct and sinks is not None, DIRECT=direct, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        **head_dims, BLOCK_DV=block_dv, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        TF32X3=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        # One batch of total_q rows: the combine kernel's row (head, t) is o_part[head, t].
        launch(sliding_window_attention_decode_combine_kernel)[(hq * total_q,)](
            o_part, lse_part, out, sinks, 0, out.stride(1), out.stride(0), out.stride(2), hq, total_q, dv, num_splits,
            HAS_SINKS=sinks is not None, BLOCK_SPLITS=max_splits, BLOCK_DV=block_dv,
            num_warps=combine_warps(block_dv),
        )
    return out


def combine_warps(block_dv: int) -> int:
    return 2 if block_dv < 128 else (4 if block_dv <= 256 else 8)


# ----------------------------------------------------------------------------------------- AOT
# Hot configs: 16-bit at head dims 64 and 128, both row tiles (16: decode with groups up to 16; 64: MQA-like
# groups and prefill chunks), the direct and the split variant. The combine kernel is the sliding-window
# decode combine, whose specs that module lists. The page size is a runtime argument (transformers' default
# page is 256 tokens, vLLM's 16): one spec serves every page size. The latent kernel: MLA's 576 / 512 in 16 bit
# with the values taken from the key tile (MLA's pages: v_cache is the view of k_cache's first 512 columns), both
# row tiles, direct and split, and the combine at 512 value columns with its LATENT_MAX_SPLITS.
def _signature(p: str) -> dict:
    return {"q_ptr": p, "k_ptr": p, "v_ptr": p, "block_table_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
            "seqlens_k_ptr": "*i32", "o_ptr": p, "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "sinks_ptr": "*fp32",
            **{f"stride_q{n}": "i32" for n in "th"}, **{f"stride_k{n}": "i32" for n in "bsh"},
            **{f"stride_v{n}": "i32" for n in "bsh"}, **{f"stride_o{n}": "i32" for n in "th"},
            "table_row_stride": "i32", "NUM_SEQS": "i32", "TOTAL_Q": "i32", "GROUPS": "i32", "HEADS_PER_TILE": "i32",
            "BLOCK_Q": "i32", "PAGE_SIZE": "i32", "DQK": "i32", "DV": "i32", "window": "i32", "qk_scale_log2": "fp32",
            "keys_per_split": "i32", "NUM_SPLITS": "i32"}


def aot_specs() -> list[AOTSpec]:
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        p, tag = ptr(dtype), str(dtype).replace("torch.", "")
        signature = _signature(p)
        for d in (64, 128):
            for rows in decode_row_tiles(dtype):
                cfg = config(rows, d, d, dtype)
                for direct in (True, False):
                    specs.append(AOTSpec(
                        name=f"{'direct' if direct else 'split'}_m{rows}_{tag}_d{d}",
                        kernel=paged_sliding_window_attention_kernel, signature=signature,
                        constexprs=dict(**_unit_head_strides("q", "k", "v", "o"), HAS_SINKS=direct, DIRECT=direct,
                                        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DQK=d, BLOCK_DV=d,
                                        UPCAST=False, TF32X3=False),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        divisible_by_16=(*_aligned(signature), "PAGE_SIZE"),
                    ))
        block_da, block_db = latent_chunks(576)
        for rows in LATENT_ROW_TILES:
            cfg = latent_config(rows, dtype)
            for direct in (True, False):
                specs.append(AOTSpec(
                    name=f"latent_{'direct' if direct else 'split'}_m{rows}_{tag}_d576x512",
                    kernel=paged_latent_attention_kernel, signature=signature,
                    constexprs=dict(**_unit_head_strides("q", "k", "v", "o"), HAS_SINKS=direct, DIRECT=direct,
                                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DA=block_da,
                                    BLOCK_DB=block_db, BLOCK_DV=512, UPCAST=False, TF32X3=False,
                                    V_IS_K_PREFIX=True),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    divisible_by_16=(*_aligned(signature), "PAGE_SIZE"),
                ))
        combine = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "o_ptr": p, "sinks_ptr": "*fp32",
                   "stride_ob": "i32", "stride_oh": "i32", "stride_os": "i32", "HQ": "i32", "SEQ_Q": "i32",
                   "DV": "i32", "NUM_SPLITS": "i32"}
        specs.append(AOTSpec(
            name=f"latent_combine_{tag}_dv512", kernel=sliding_window_attention_decode_combine_kernel,
            signature=combine, divisible_by_16=_aligned(combine),
            constexprs=dict(**_unit_head_strides("o"), HAS_SINKS=True, BLOCK_SPLITS=LATENT_MAX_SPLITS, BLOCK_DV=512),
            num_warps=combine_warps(512), num_stages=1,
        ))
    return specs
