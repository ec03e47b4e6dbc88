"""Grouped (MoE) 4-bit dequant GEMM for dsattn.int4_grouped_matmul: every (row, slot) pair of x goes through
its own expert's int4 weight, all experts in one launch.

out[p] = x[p // slots] @ dequantize(W[expert_ids[p]]).T (* weights[p]), p over the flattened [M, slots]
pairs; W stacked as qweight int32 [E, N, K/8], scales [E, N, K/g], zeros uint8 [E, N, K/g] (the
dsattn.quant.int4 layout per expert). Expert ids outside [0, E) (transformers marks dropped slots with E)
give zero rows.

Routing (sort_pairs_by_expert, plain torch on the device, no host sync): pairs are sorted by expert and each
expert's run is padded to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one expert (the
layout of vLLM's moe_align_block_size). Out-of-range pairs form one more bucket, E, whose blocks store zeros,
so every output row is written exactly once. The grid covers an upper bound of the block count known on the
host (min(pairs, cdiv(pairs, BLOCK_M) + E + 1)); blocks past the used ones carry expert E + 1 and exit.

Each program computes one [BLOCK_M, BLOCK_N] tile of one block with the dense kernel's K loop
(int4_matmul.dequant_tile_dot: packed words widened in registers, dequantized, tl.dot with fp32
accumulation); x rows are gathered through the block's pair ids, output rows scattered back. Tiles come
from int4_matmul.matmul_config by the mean pairs per expert (decode: 16-row tiles; prefill: 128 x 128).
No split-K: the experts already give enough tiles in decode.
"""

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, interpreting, ptr
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
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    grid_m = tl.num_programs(0) // grid_n
    band = GROUP_M * grid_n  # bands of GROUP_M blocks (mostly one expert's) share weight tiles in L2
    first_m = (pid // band) * GROUP_M
    band_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_rows
    pid_n = (pid % band) // band_rows

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
def sort_pairs_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """expert_ids [P] (any int dtype; outside [0, E) = dropped) -> (pair_ids int32 [blocks * block_m],
    block_expert int32 [blocks]), blocks = max_blocks(P, E, block_m), all computed on the device (no host sync).

    Pairs sorted by expert (stable), each expert's run starting at a multiple of block_m, padding = P;
    dropped pairs form bucket E; block_expert[b] is the bucket of block b, E + 1 past the used blocks."""
    p = expert_ids.numel()
    device = expert_ids.device
    ids = expert_ids.reshape(-1).to(torch.int64)
    bucket = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    # scatter_add, not bincount: bincount reads max() back to the host on CUDA.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    count_start = torch.cumsum(counts, 0) - counts
    sorted_bucket, order = torch.sort(bucket, stable=True)
    rank = torch.arange(p, device=device) - count_start[sorted_bucket]
    dest = (block_end - blocks)[sorted_bucket] * block_m + rank
    total = max_blocks(p, num_experts, block_m)
    pair_ids = torch.full((total * block_m,), p, dtype=torch.int32, device=device)
    pair_ids[dest] = order.to(torch.int32)
    block_expert = torch.searchsorted(block_end, torch.arange(total, device=device), right=True).to(torch.int32)
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
    int4_grouped_matmul_kernel[grid](
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
    return list(specs.values())
