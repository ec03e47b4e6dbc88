"""Unpack int4 weights: int32 [N, K/8] words of eight nibbles -> uint8 [N, K].

Layout (dsattn.quant.int4): element (n, 8*j + i) sits in bits [4i, 4i+4) of qweight[n, j]. The dequant GEMM
kernels unpack the same way inside their K loop; this standalone kernel serves dequantize() on GPU.
"""

import torch
import triton
import triton.language as tl

from ._common import AOTSpec, launch

BLOCK_N = 32
BLOCK_WORDS = 32


@triton.jit
def int4_unpack_kernel(
    q_ptr, out_ptr, N, WORDS, stride_qn, stride_qw, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_WORDS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = rn.to(tl.int64)  # N x K reaches 2^31 for large embeddings: 64-bit offsets
    rw = pid_w * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    mask = (rn[:, None] < N) & (rw[None, :] < WORDS)
    words = tl.load(q_ptr + rows[:, None] * stride_qn + rw.to(tl.int64)[None, :] * stride_qw, mask=mask, other=0)
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_WORDS, 8]
    cols = rw[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_WORDS, 8]
    out_ptrs = out_ptr + rows[:, None, None] * stride_on + cols[None, :, :]
    tl.store(out_ptrs, nibbles.to(tl.uint8), mask=mask[:, :, None])


def int4_unpack(qweight: torch.Tensor) -> torch.Tensor:
    n, words = qweight.shape
    out = torch.empty((n, words * 8), dtype=torch.uint8, device=qweight.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(words, BLOCK_WORDS))
    launch(int4_unpack_kernel)[grid](
        qweight, out, n, words, qweight.stride(0), qweight.stride(1), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_WORDS=BLOCK_WORDS,
    )
    return out


def aot_specs() -> list[AOTSpec]:
    return [
        AOTSpec(
            name="int4_unpack",
            kernel=int4_unpack_kernel,
            signature={"q_ptr": "*i32", "out_ptr": "*u8", "N": "i32", "WORDS": "i32",
                       "stride_qn": "i32", "stride_qw": "i32", "stride_on": "i32"},
            constexprs={"BLOCK_N": BLOCK_N, "BLOCK_WORDS": BLOCK_WORDS},
            num_warps=4,
            num_stages=1,
        )
    ]
