"""4-bit dequant GEMM for dsattn.int4_matmul: out [M, N] = x [M, K] @ dequantize(qweight).T (+ bias).

Layout (dsattn.quant.int4): qweight int32 [N, K/8], element (n, 8j + i) in bits [4i, 4i+4) of qweight[n, j];
scales [N, K/g], zeros uint8 [N, K/g]; w = (q - zero) * scale. The dequantized weight never exists in memory:
each program streams a [BLOCK_N, BLOCK_K/8] tile of packed words, widens it to [BLOCK_N, BLOCK_K] in
registers (tl.interleave repeats every word 8 times, column c keeps nibble c % 8: the unpack of
AWQ/vLLM's Triton kernel, along K here), dequantizes and feeds tl.dot with fp32 accumulation.

- BLOCK_K always divides group_size (the launcher picks the largest power of two <= the tile's BLOCK_K that
  does), so one (scale, zero) per weight row serves a whole K tile: two [BLOCK_N] loads per tile.
- Split-K for few output tiles (decode, M <= 16, and any shape with fewer tiles than the GPU wants): the
  programs of one output tile split K and atomically add fp32 partial sums into a zeroed fp32 buffer, which
  the launcher casts to x's dtype (a run-to-run order of additions, i.e. not bitwise deterministic).
- fp16/bf16 x: the weight is dequantized to x's dtype ((q - z) exact, one rounding for the scale), like the
  reference's scales-dtype weight. fp32 x: fp32 weights and tl.dot as tf32x3 (three tensor-core passes,
  fp32-accurate: the 1e-5 tolerance holds), as the other dsattn modules do.
- AWQ input_scale is folded into x by the caller; bias is added in fp32 before the cast (by split 0 under
  split-K). Rows beyond M / N read a valid row (index modulo M / N) and are not stored, so loads need no mask;
  K needs none since K % BLOCK_K == 0.
- Offsets: row offsets (x, weight, scale, output rows) are 64-bit; offsets within a row (K columns of x at
  unit stride, the launcher copies other strides; N columns of one output tile) stay in int32. So the
  kernels take any M x K and N x K the sizes (int32 M, N, K) allow: no offset limit in dsattn.capabilities.
"""

import torch
import triton
import triton.language as tl

from dsattn import capabilities

from ._common import AOTSpec, interpreting, launch, ptr, tile_coords

GROUP_M = 8  # output tiles ordered in bands of 8 row tiles: a band's programs share weight tiles in L2
# tl.dot's smallest K: group sizes must be multiples of it (declared in dsattn.capabilities)
MIN_BLOCK_K = capabilities.of("int4_matmul")["triton"].group_size_multiple
MIN_K_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def dequant_tile_dot(acc, x_ptrs, q_ptrs, s_rows, z_rows, k, group_size, shifts, UPCAST: tl.constexpr,
                     TF32X3: tl.constexpr):
    """acc + x_tile @ dequantize(weight_tile).T for one K tile (shared by the dense and grouped kernels).
    x_ptrs [BLOCK_M, BLOCK_K], q_ptrs [BLOCK_N, BLOCK_K // 8] packed words, s_rows / z_rows [BLOCK_N] row
    pointers of the scales / zeros; k: the tile's first column (BLOCK_K divides group_size)."""
    x = tl.load(x_ptrs)
    words = tl.load(q_ptrs)  # [BLOCK_N, BLOCK_K // 8]
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)  # [BLOCK_N, BLOCK_K]: word c // 8 in column c
    q = (words >> shifts[None, :]) & 0xF  # arithmetic shift; the mask drops the sign bits
    group = k // group_size  # BLOCK_K divides group_size: one group per tile
    scale = tl.load(s_rows + group)
    zero = tl.load(z_rows + group).to(tl.int32)
    if UPCAST:  # interpreter: bf16 tl.dot multiplies bit patterns; compute in fp32
        x = x.to(tl.float32)
        w = (q - zero[:, None]).to(tl.float32) * scale.to(tl.float32)[:, None]
    else:
        w = (q - zero[:, None]).to(x.dtype) * scale.to(x.dtype)[:, None]
    if TF32X3:
        acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3", out_dtype=tl.float32)
    else:
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.float32)
    return acc


@triton.jit
def int4_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, TF32X3: tl.constexpr,
):
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    shifts = (offs_k % 8) * 4  # column c of the widened tile holds nibble c % 8 of word c // 8

    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
    q_ptrs = q_ptr + rows_n[:, None] * stride_qn + (k_lo // 8 + offs_w)[None, :]
    s_rows = s_ptr + rows_n * stride_sn
    z_rows = z_ptr + rows_n * stride_zn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        acc = dequant_tile_dot(acc, x_ptrs, q_ptrs, s_rows, z_rows, k, group_size, shifts, UPCAST, TF32X3)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K // 8

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows_n).to(tl.float32)
        if SPLIT_K:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
    # int64 tile base, int32 offsets within the tile: 64-bit per-element addresses cost ~100 registers here.
    out_tile = out_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_om
    out_ptrs = out_tile + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- configs
# Row-tile classes: decode (M <= 16: one 16-row MMA tile, wide K tiles to stream the weight, split-K),
# small batches (M <= 64) and prefill (128 x 128 tiles, 8 warps). fp32 (tf32x3 dots) halves the K tile.
ROW_TILES = (16, 64, 128)


def matmul_config(m: int, dtype: torch.dtype) -> dict:
    """Tile config for M rows of x in dtype; BLOCK_K is the most a tile may take (block_k() may halve it).
    split: whether split-K may be used (not for the 128 x 128 prefill tile: enough tiles, and its atomic
    epilogue would spill on sm_80)."""
    fp32 = dtype == torch.float32
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64 if fp32 else 128, num_warps=4,
                    num_stages=2 if fp32 else 4, programs_per_sm=4, split=True)
    if m <= 64:  # fp32 on 8 warps: 4 spill on sm_80 under Triton 3.8
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32 if fp32 else 64, num_warps=8 if fp32 else 4,
                    num_stages=2 if fp32 else 4, programs_per_sm=2, split=True)
    if fp32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2, programs_per_sm=2, split=False)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4, programs_per_sm=2, split=False)


def block_k(group_size: int, most: int) -> int:
    """The largest power of two <= most dividing group_size (so a K tile never straddles two groups)."""
    bk = most
    while bk >= MIN_BLOCK_K and group_size % bk != 0:
        bk //= 2
    return bk


def block_k_options(most: int) -> tuple[int, ...]:
    """Every BLOCK_K block_k() can return for a tile whose BLOCK_K is `most`."""
    return tuple(bk for bk in (128, 64, 32, 16) if bk <= most)


def check_group_size(group_size: int) -> None:
    """Direct callers only: the op's backend selection has refused such group sizes already."""
    if block_k(group_size, 128) < MIN_BLOCK_K:
        raise ValueError(
            f"dsattn.int4_matmul: the Triton kernel needs group_size % {MIN_BLOCK_K} == 0, got {group_size}; "
            "use backend='cuda' or 'torch'"
        )


def _num_splits(tiles: int, k: int, bk: int, programs_per_sm: int, device: torch.device) -> int:
    """Enough K splits to give each SM about programs_per_sm programs, each with >= MIN_K_PER_SPLIT of K."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, (programs_per_sm * sms) // max(1, tiles))
    most = max(1, k // max(MIN_K_PER_SPLIT, bk))
    return int(min(want, most, MAX_SPLITS))


# ----------------------------------------------------------------------------------------- launcher
def int4_matmul(x, qweight, scales, zeros, group_size, bias=None, *, split_k=None, out=None):
    """x [M, K] fp16/bf16/fp32 (any strides; AWQ input_scale already applied), qweight int32 [N, K/8],
    scales [N, K/g], zeros uint8 [N, K/g], bias [N] or None -> [M, N] in x's dtype.
    split_k: K splits (None: chosen from the tile count and the SM count; 1 turns split-K off).
    out: optional contiguous [M, N] buffer in x's dtype that receives the result."""
    check_group_size(group_size)
    m, k = x.shape
    n = qweight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()  # unit K stride: the column offsets stay within int32
    if qweight.stride(1) != 1:
        qweight = qweight.contiguous()
    scales = scales if scales.stride(1) == 1 else scales.contiguous()
    zeros = zeros if zeros.stride(1) == 1 else zeros.contiguous()
    if m == 0 or n == 0 or k == 0:
        result = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        result = (result + bias.float() if bias is not None else result).to(x.dtype)
        return result if out is None else out.copy_(result)
    cfg = matmul_config(m, x.dtype)
    bk = block_k(group_size, cfg["BLOCK_K"])
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if not cfg["split"]:
        split_k = 1
    elif split_k is None:
        split_k = _num_splits(tiles, k, bk, cfg["programs_per_sm"], x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, split_k)), bk) * bk
    split_k = triton.cdiv(k, k_per_split)
    split = split_k > 1
    if split:
        result = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        result = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    launch(int4_matmul_kernel)[(tiles, split_k)](
        x, qweight, scales, zeros, bias if bias is not None else result, result,
        m, n, k, group_size, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), result.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=GROUP_M,
        UPCAST=interpreting() and x.dtype == torch.bfloat16, TF32X3=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not split:
        return result
    return result.to(x.dtype) if out is None else out.copy_(result)


# ----------------------------------------------------------------------------------------- AOT
# Every tile class x every BLOCK_K its group sizes can give x split-K on/off, per x dtype (scales and bias in
# x's dtype: the hot path; other scale dtypes JIT the same tiles). fp32 (tf32x3) configs are not hot.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REPRESENTATIVE_M = {16: 1, 64: 64, 128: 4096}


def aot_specs() -> list[AOTSpec]:
    specs = {}
    for dtype in DTYPES:
        p = ptr(dtype)
        name = str(dtype).replace("torch.", "")
        for block_m, m in REPRESENTATIVE_M.items():
            cfg = matmul_config(m, dtype)
            for bk in block_k_options(cfg["BLOCK_K"]):
                for split in (False, True) if cfg["split"] else (False,):
                    signature = {"x_ptr": p, "q_ptr": "*i32", "s_ptr": p, "z_ptr": "*u8", "bias_ptr": p,
                                 "out_ptr": "*fp32" if split else p,
                                 "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "k_per_split": "i32",
                                 "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
                                 "stride_zn": "i32", "stride_om": "i32"}
                    spec_name = f"{name}_m{cfg['BLOCK_M']}_n{cfg['BLOCK_N']}_k{bk}{'_splitk' if split else ''}"
                    specs[spec_name] = AOTSpec(  # fp32 prefill shares the M <= 64 tile: one entry
                        name=spec_name,
                        kernel=int4_matmul_kernel,
                        signature=signature,
                        constexprs=dict(stride_xk=1, HAS_BIAS=True, SPLIT_K=split, BLOCK_M=cfg["BLOCK_M"],
                                        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, GROUP_M=GROUP_M, UPCAST=False,
                                        TF32X3=dtype == torch.float32),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        divisible_by_16=tuple(a for a in signature if a.startswith(("x_", "q_", "s_", "z_",
                                                                                    "bias_", "out_", "stride_"))
                                              and a != "stride_sn" and a != "stride_zn"),
                        hot=dtype != torch.float32,
                    )
    return list(specs.values())
