"""8-bit weight-only GEMM for dsattn.int8_matmul: out [M, N] = x [M, K] @ dequantize(qweight).T (+ bias).

Layout (dsattn.quant.int8): qweight int8 [N, K]; scales [N] per output channel (PER_CHANNEL) or [N, K/g];
w = q * scale. The dequantized weight never exists in memory: each program streams [BLOCK_N, BLOCK_K] int8
tiles of the weight (half the bytes of fp16), widens them in registers and feeds tl.dot with fp32
accumulation.

- Per output channel: the K loop only converts q to x's dtype (exact: |q| <= 127 fits fp16/bf16/tf32) and the
  scale multiplies the fp32 accumulator once per output column in the epilogue.
- Per group: BLOCK_K divides group_size (block_k() of the int4 kernel), so one scale per weight row serves a
  whole K tile: one [BLOCK_N] load per tile, the tile dequantized to x's dtype before the dot (one rounding,
  like the reference's scales-dtype weight).
- fp32 x: tl.dot as tf32x3 (fp32-accurate: the 1e-5 tolerance holds), as the other dsattn modules do.
- Rows beyond M / N read a valid row (index modulo M / N) and are not stored, so row loads need no mask. K is
  masked only when BLOCK_K does not divide it (EVEN_K false: per-channel weights of an odd K).
- Offsets: row offsets are 64-bit, offsets within a row stay in int32 (the launcher gives x a unit K stride),
  so there is no offset limit in dsattn.capabilities. No split-K: decode programs stream whole rows of K.
"""

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, interpreting, launch, ptr, tile_coords
from .int4_matmul import GROUP_M, MIN_BLOCK_K, block_k


@triton.jit
def int8_matmul_kernel(
    x_ptr, q_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, TF32X3: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    q_ptrs = q_ptr + rows_n[:, None] * stride_qn + offs_k[None, :]
    s_rows = s_ptr + rows_n * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            q = tl.load(q_ptrs)
        else:
            in_k = (k + offs_k) < K
            x = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=in_k[None, :], other=0)
        if UPCAST:  # interpreter: bf16 tl.dot multiplies bit patterns; compute in fp32
            x = x.to(tl.float32)
        w = q.to(x.dtype)
        if not PER_CHANNEL:
            scale = tl.load(s_rows + k // group_size)  # BLOCK_K divides group_size: one group per tile
            w = w * scale.to(x.dtype)[:, None]
        if TF32X3:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3", out_dtype=tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.float32)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K

    if PER_CHANNEL:
        acc *= tl.load(s_rows).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_tile = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_om
    out_ptrs = out_tile + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- configs
# Row-tile classes: decode (M <= 16: one 16-row MMA tile, wide K tiles to stream the weight), small batches
# (M <= 64) and prefill (128 x 128 tiles, 8 warps). fp32 (tf32x3 dots) takes smaller tiles.
def matmul_config(m: int, dtype: torch.dtype) -> dict:
    """Tile config for M rows of x in dtype; BLOCK_K is the most a tile may take (block_k() may halve it)."""
    fp32 = dtype == torch.float32
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64 if fp32 else 128, num_warps=4, num_stages=2 if fp32 else 4)
    if m <= 64 or fp32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32 if fp32 else 64, num_warps=8 if fp32 else 4,
                    num_stages=2 if fp32 else 4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def tile_k(k: int, group_size: int | None, most: int) -> tuple[int, bool]:
    """(BLOCK_K, EVEN_K): per group, the largest power of two <= most dividing group_size; per channel, the
    one dividing K if there is one (no K mask), else `most` with a masked last tile."""
    if group_size is not None:
        return block_k(group_size, most), True
    bk = block_k(k, most)
    return (bk, True) if bk >= MIN_BLOCK_K else (most, False)


def check_group_size(group_size: int | None) -> None:
    """Direct callers only: the op's backend selection has refused such group sizes already."""
    if group_size is not None and block_k(group_size, 128) < MIN_BLOCK_K:
        raise ValueError(f"dsattn.int8_matmul: the Triton kernel needs group_size % {MIN_BLOCK_K} == 0 "
                         f"(or per-channel scales), got {group_size}; use backend='torch'")


# ----------------------------------------------------------------------------------------- launcher
def int8_matmul(x, qweight, scales, group_size=None, bias=None, *, out=None):
    """x [M, K] fp16/bf16/fp32 (any strides), qweight int8 [N, K], scales [N] (group_size None) or [N, K/g],
    bias [N] or None -> [M, N] in x's dtype. out: optional contiguous [M, N] buffer in x's dtype."""
    check_group_size(group_size)
    m, k = x.shape
    n = qweight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()  # unit K stride: the column offsets stay within int32
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    if group_size is None:
        scales = scales.contiguous()
    elif scales.stride(1) != 1:
        scales = scales.contiguous()
    result = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return result
    if k == 0:
        return result.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(result))
    cfg = matmul_config(m, x.dtype)
    bk, even_k = tile_k(k, group_size, cfg["BLOCK_K"])
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    launch(int8_matmul_kernel)[(tiles,)](
        x, qweight, scales, bias if bias is not None else result, result,
        m, n, k, group_size or k,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), result.stride(0),
        HAS_BIAS=bias is not None, PER_CHANNEL=group_size is None, EVEN_K=even_k,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=GROUP_M,
        UPCAST=interpreting() and x.dtype == torch.bfloat16, TF32X3=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return result


# ----------------------------------------------------------------------------------------- AOT
# Hot: per-channel (the common int8 checkpoint) fp16/bf16 decode and prefill with K a multiple of the tile.
# Not hot: grouped scales (g = 128) on bf16 at the same tiles; other shapes JIT the same kernel.
REPRESENTATIVE_M = (1, 4096)


def aot_specs() -> list[AOTSpec]:
    specs = []
    cases = [(dtype, True) for dtype in (torch.float16, torch.bfloat16)] + [(torch.bfloat16, False)]
    for dtype, per_channel in cases:
        p = ptr(dtype)
        name = str(dtype).replace("torch.", "")
        for m in REPRESENTATIVE_M:
            cfg = matmul_config(m, dtype)
            bk, _ = tile_k(4096, None if per_channel else 128, cfg["BLOCK_K"])
            signature = {"x_ptr": p, "q_ptr": "*i8", "s_ptr": p, "bias_ptr": p, "out_ptr": p,
                         "M": "i32", "N": "i32", "K": "i32", "group_size": "i32",
                         "stride_xm": "i32", "stride_qn": "i32", "stride_om": "i32"}
            if not per_channel:
                signature["stride_sn"] = "i32"
            constexprs = dict(stride_xk=1, HAS_BIAS=True, PER_CHANNEL=per_channel, EVEN_K=True,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=GROUP_M,
                              UPCAST=False, TF32X3=False)
            if per_channel:
                constexprs["stride_sn"] = 1
            specs.append(AOTSpec(
                name=f"{name}_{'channel' if per_channel else 'g128'}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}_k{bk}",
                kernel=int8_matmul_kernel,
                signature=signature,
                constexprs=constexprs,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                divisible_by_16=tuple(a for a in signature if a.startswith(("x_", "q_", "s_", "bias_", "out_",
                                                                            "stride_")) and a != "stride_sn"),
                hot=per_channel,
            ))
    return specs
