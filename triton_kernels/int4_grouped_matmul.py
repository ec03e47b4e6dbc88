"""Grouped (MoE) 4-bit dequant GEMM for dsattn.int4_grouped_matmul: every (row, slot) pair of x goes through
its own expert's int4 weight, all experts in one launch.

out[p] = x[p // slots] @ dequantize(W[expert_ids[p]]).T (* weights[p]), p over the flattened [M, slots]
pairs; W stacked as qweight int32 [E, N, K/8], scales [E, N, K/g], zeros uint8 [E, N, K/g] (the
dsattn.quant.int4 layout per expert). Expert ids outside [0, E) (transformers marks dropped slots with E)
give zero rows.

Routing (sort_pairs_by_expert: one single-program launch, no host sync): pairs are sorted by expert (stable)
and each expert's run is padded to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one expert
(the layout of vLLM's moe_align_block_size). Out-of-range pairs form one more bucket, E, whose blocks store
zeros, so every output row is written exactly once. The grid covers a bound on the block count known on the
host (min(pairs, cdiv(pairs, BLOCK_M) + E + 1)); blocks past the used ones carry expert E + 1 and exit. The
sort kernel is one program (histogram, cumsum, then a scatter of 64 pairs per step with ranks from a 64 x 64
same-expert matrix): a decode step's routing costs one small launch instead of ~25 torch ops; a long prefill
(P = 32K pairs) runs 512 sequential steps in that one program (not yet timed on a GPU).

Each program computes one [BLOCK_M, BLOCK_N] tile of one block with the dense kernel's K loop
(int4_matmul.dequant_tile_dot: packed words widened in registers, dequantized, tl.dot with fp32
accumulation); x rows are gathered through the block's pair ids, output rows scattered back. Tiles come
from int4_matmul.matmul_config by the mean pairs per expert (decode: 16-row tiles; prefill: 128 x 128).
No split-K: the experts already give enough tiles in decode.
"""

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, interpreting, launch, ptr, tile_coords
from .int4_matmul import GROUP_M, block_k, block_k_options, check_group_size, dequant_tile_dot, matmul_config


@triton.jit
def int4_grouped_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, w_ptr, out_ptr, pair_ptr, block_expert_ptr,
    num_pairs, slots, num_experts, N, K, group_size,
    stride_xm, stride_xk, stride_qe, stride_qn, stride_se, stride_sn, stride_ze, stride_zn, stride_om,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, TF32X3: tl.constexpr,
):
    grid_n = tl.cdiv(N, BLOCK_N)
    # bands of GROUP_M blocks (mostly one expert's) share weight tiles in L2
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.num_programs(0) // grid_n, grid_n, GROUP_M)

    expert = tl.load(block_expert_ptr + pid_m)
    if expert > num_experts:  # past the used blocks
        return
    pairs = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # num_pairs: padding
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = valid[:, None] & (offs_n[None, :] < N)
    if expert == num_experts:  # dropped slots
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=mask)
        return

    # Padding rows read row 0 and weight rows beyond N read row N - 1 (a valid address): not stored, so loads
    # need no mask; K needs none since K % BLOCK_K == 0.
    rows_m = (tl.where(valid, pairs, 0) // slots).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = (offs_k % 8) * 4  # column c of the widened tile holds nibble c % 8 of word c // 8
    e = expert.to(tl.int64)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    q_ptrs = q_ptr + e * stride_qe + rows_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // 8)[None, :]
    s_rows = s_ptr + e * stride_se + rows_n * stride_sn
    z_rows = z_ptr + e * stride_ze + rows_n * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        acc = dequant_tile_dot(acc, x_ptrs, q_ptrs, s_rows, z_rows, k, group_size, shifts, UPCAST, TF32X3)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K // 8

    if HAS_WEIGHTS:  # routing weights applied in fp32, before the one rounding to x's dtype
        acc *= tl.load(w_ptr + tl.where(valid, pairs, 0)).to(tl.float32)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- routing
SORT_BLOCK_P = 64  # pairs per step of the scatter (a [64, 64] same-bucket matrix gives ranks within the step)
SORT_NUM_WARPS = 16  # fewer left an 8-byte stack frame at 512 buckets on sm_90 (4: Triton 3.9, 8: Triton 3.8)


@triton.jit
def _bucket_of(ids_ptr, p, num_pairs, num_experts):
    """Expert id of pairs p; outside [0, E) -> E (dropped); p past the end -> E + 1 (ignored)."""
    live = p < num_pairs
    e = tl.load(ids_ptr + p, mask=live, other=0)
    bucket = tl.where((e >= 0) & (e < num_experts), e, num_experts).to(tl.int32)
    return tl.where(live, bucket, num_experts + 1)


@triton.jit
def sort_pairs_kernel(ids_ptr, pair_ptr, block_expert_ptr, cursor_ptr, num_pairs, num_experts, block_m, num_blocks,
                      BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: bucket counts (histogram), blocks per bucket (cumsum), block_expert, then a stable scatter
    of the pair ids, BLOCK_P pairs per step, through per-bucket cursors kept in cursor_ptr [BLOCK_E]."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    real = offs_e <= num_experts  # E experts + the dropped bucket; the rest of BLOCK_E is spare
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        counts += tl.histogram(_bucket_of(ids_ptr, start + offs_p, num_pairs, num_experts), BLOCK_E)
    counts = tl.where(real, counts, 0)
    blocks = (counts + block_m - 1) // block_m
    block_end = tl.cumsum(blocks, 0)
    tl.store(cursor_ptr + offs_e, (block_end - blocks) * block_m)  # each bucket's first padded row

    offs_b = tl.arange(0, BLOCK_B)
    for start in range(0, num_blocks, BLOCK_B):
        b = start + offs_b
        # the bucket of block b: how many real buckets end at or before it (E + 1 past the used blocks)
        owner = tl.sum(((block_end[None, :] <= b[:, None]) & real[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, owner, mask=b < num_blocks)
    for start in range(0, num_blocks * block_m, BLOCK_P):  # padding everywhere; the scatter overwrites
        tl.store(pair_ptr + start + offs_p, num_pairs, mask=start + offs_p < num_blocks * block_m)
    tl.debug_barrier()  # the cursors and the padding are written before any thread reads / overwrites them

    for start in range(0, num_pairs, BLOCK_P):
        p = start + offs_p
        bucket = _bucket_of(ids_ptr, p, num_pairs, num_experts)
        base = tl.load(cursor_ptr + bucket)
        same = bucket[:, None] == bucket[None, :]
        rank = tl.sum((same & (offs_p[None, :] < offs_p[:, None])).to(tl.int32), axis=1)  # stable
        tl.store(pair_ptr + base + rank, p, mask=p < num_pairs)
        tl.debug_barrier()  # every lane has read its cursor before any moves
        # every pair of a bucket writes the same new cursor: base + the bucket's pairs in this step
        tl.store(cursor_ptr + bucket, base + tl.sum(same.to(tl.int32), axis=1))
        tl.debug_barrier()


def sort_block_config(num_experts: int) -> dict:
    block_e = triton.next_power_of_2(num_experts + 2)
    return dict(BLOCK_E=block_e, BLOCK_P=SORT_BLOCK_P, BLOCK_B=max(1, 4096 // block_e))


def sort_pairs_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """expert_ids [P] (int32/int64; outside [0, E) = dropped) -> (pair_ids int32 [blocks * block_m],
    block_expert int32 [blocks]), blocks = max_blocks(P, E, block_m): one launch, no host sync.

    Pairs sorted by expert (stable), each expert's run starting at a multiple of block_m, padding = P;
    dropped pairs form bucket E; block_expert[b] is the bucket of block b, E + 1 past the used blocks."""
    p = expert_ids.numel()
    device = expert_ids.device
    ids = expert_ids.reshape(-1)
    total = max_blocks(p, num_experts, block_m)
    pair_ids = torch.empty(total * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(total, dtype=torch.int32, device=device)
    if total == 0:
        return pair_ids, block_expert
    cfg = sort_block_config(num_experts)
    cursor = torch.empty(cfg["BLOCK_E"], dtype=torch.int32, device=device)
    launch(sort_pairs_kernel)[(1,)](ids, pair_ids, block_expert, cursor, p, num_experts, block_m, total, **cfg,
                            num_warps=SORT_NUM_WARPS)
    return pair_ids, block_expert


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Host-side bound on the padded block count: every used block holds >= 1 pair, and padding adds < 1
    block per bucket (E experts + the dropped bucket)."""
    return min(pairs, triton.cdiv(pairs, block_m) + num_experts + 1)


def grouped_config(pairs: int, num_experts: int, dtype: torch.dtype) -> dict:
    """The dense kernel's tile for the mean rows per expert (a host-side guess: no routing read back)."""
    return matmul_config(triton.cdiv(pairs, max(1, num_experts)), dtype)


# ----------------------------------------------------------------------------------------- launcher
def int4_grouped_matmul(x, qweight, scales, zeros, group_size, expert_ids, slots=1, weights=None, *, out=None):
    """x [M, K] fp16/bf16/fp32 (any strides), qweight int32 [E, N, K/8], scales [E, N, K/g], zeros uint8
    [E, N, K/g], expert_ids [M * slots] (pair p = (p // slots, p % slots) reads x row p // slots), weights
    [M * slots] or None -> [M * slots, N] in x's dtype. out: optional [M * slots, N] buffer (row stride any,
    unit column stride) in x's dtype."""
    check_group_size(group_size)
    m, k = x.shape
    num_experts, n = qweight.shape[0], qweight.shape[1]
    p = expert_ids.numel()
    x = x if x.stride(1) == 1 else x.contiguous()  # unit K stride: the column offsets stay within int32
    if qweight.stride(2) != 1:
        qweight = qweight.contiguous()
    scales = scales if scales.stride(2) == 1 else scales.contiguous()
    zeros = zeros if zeros.stride(2) == 1 else zeros.contiguous()
    result = out if out is not None else torch.empty(p, n, dtype=x.dtype, device=x.device)
    if p == 0 or n == 0:
        return result
    if k == 0:
        return result.zero_()
    cfg = grouped_config(p, num_experts, x.dtype)
    block_m = cfg["BLOCK_M"]
    pair_ids, block_expert = sort_pairs_by_expert(expert_ids, num_experts, block_m)
    grid = (block_expert.numel() * triton.cdiv(n, cfg["BLOCK_N"]),)
    launch(int4_grouped_matmul_kernel)[grid](
        x, qweight, scales, zeros, weights if weights is not None else x, result, pair_ids, block_expert,
        p, slots, num_experts, n, k, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), result.stride(0),
        HAS_WEIGHTS=weights is not None,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k(group_size, cfg["BLOCK_K"]), GROUP_M=GROUP_M,
        UPCAST=interpreting() and x.dtype == torch.bfloat16, TF32X3=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return result


# ----------------------------------------------------------------------------------------- AOT
# Every tile class x every BLOCK_K its group sizes can give, with and without routing weights (gate_up runs
# without, down with), per x dtype; scales in x's dtype, weights fp32 (transformers' router output).
# fp32 (tf32x3) configs are not hot.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REPRESENTATIVE_PAIRS_PER_EXPERT = {16: 1, 64: 64, 128: 4096}
SORT_BLOCK_E = (16, 32, 64, 128, 256, 512)


def aot_specs() -> list[AOTSpec]:
    specs = {}
    for dtype in DTYPES:
        p = ptr(dtype)
        name = str(dtype).replace("torch.", "")
        for rows in REPRESENTATIVE_PAIRS_PER_EXPERT.values():
            cfg = matmul_config(rows, dtype)
            for bk in block_k_options(cfg["BLOCK_K"]):
                for has_weights in (False, True):
                    signature = {"x_ptr": p, "q_ptr": "*i32", "s_ptr": p, "z_ptr": "*u8", "w_ptr": "*fp32",
                                 "out_ptr": p, "pair_ptr": "*i32", "block_expert_ptr": "*i32",
                                 "num_pairs": "i32", "slots": "i32", "num_experts": "i32", "N": "i32", "K": "i32",
                                 "group_size": "i32", "stride_xm": "i32", "stride_qe": "i32", "stride_qn": "i32",
                                 "stride_se": "i32", "stride_sn": "i32", "stride_ze": "i32", "stride_zn": "i32",
                                 "stride_om": "i32"}
                    spec_name = (f"{name}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}_k{bk}"
                                 f"{'_weighted' if has_weights else ''}")
                    specs[spec_name] = AOTSpec(  # fp32 prefill shares the M <= 64 tile: one entry
                        name=spec_name,
                        kernel=int4_grouped_matmul_kernel,
                        signature=signature,
                        constexprs=dict(stride_xk=1, HAS_WEIGHTS=has_weights, BLOCK_M=cfg["BLOCK_M"],
                                        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=GROUP_M, UPCAST=False,
                                        TF32X3=dtype == torch.float32),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        divisible_by_16=tuple(a for a in signature if a.endswith("_ptr") or a in (
                            "stride_xm", "stride_qe", "stride_qn", "stride_om")),
                        hot=dtype != torch.float32,
                    )
    # The routing sort: one program per call, BLOCK_E buckets (E + 2 rounded up: 8..510 experts); int64 ids
    # (transformers' top_k_index) hot, int32 ids cold.
    for ids_dtype in ("i64", "i32"):
        for block_e in SORT_BLOCK_E:
            cfg = dict(BLOCK_E=block_e, BLOCK_P=SORT_BLOCK_P, BLOCK_B=max(1, 4096 // block_e))
            assert cfg == sort_block_config(block_e - 2)
            signature = {"ids_ptr": "*" + ids_dtype, "pair_ptr": "*i32", "block_expert_ptr": "*i32",
                         "cursor_ptr": "*i32", "num_pairs": "i32", "num_experts": "i32", "block_m": "i32",
                         "num_blocks": "i32"}
            name = f"sort_{ids_dtype}_e{block_e}"
            specs[name] = AOTSpec(name=name, kernel=sort_pairs_kernel, signature=signature, constexprs=cfg,
                                  num_warps=SORT_NUM_WARPS, num_stages=1,
                                  divisible_by_16=tuple(a for a in signature if a.endswith("_ptr")),
                                  hot=ids_dtype == "i64")
    return list(specs.values())
