// Quantized-weight GEMM with bf16 activations on oneDNN's brgemm micro-kernel (torch's cpublas::brgemm):
// int4_matmul.cpp and int8_matmul.cpp take it for bf16 x where available(): on AMX from kMinRows rows; on
// AVX512-BF16 CPUs without AMX (Zen 4: oneDNN's avx512_core_bf16 brgemm, VDPBF16PS) where the callers' panel
// paths (dequantize + torch bf16 GEMM) ran, which it replaces. Raw pointers only: the implementation file
// (int4_matmul_amx.cpp) is the one that includes the oneDNN-facing torch header.
#pragma once

#include <cstdint>

namespace dsattn {
namespace amx {

// Rows of x from which the fused path runs on AMX (below, the decode kernels; see int4_matmul.cpp): from 6-7
// rows it beats them (measured). Without AMX it starts where the callers' panel paths did: there the brgemm
// loses to the decode kernels below.
constexpr int64_t kMinRows = 8;

// One weight tile in bf16: dst[r * len + i] = w[n0 + r, k0 + i] rounded to nearest-even bf16, r < rows,
// i < len (len % 32 == 0, k0 % 32 == 0).
using DequantFn = void (*)(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst);

// int4: packed q [N, K/2] bytes (even k low nibble), s float32 / z uint8 [N, K/group]; group % 32 == 0.
struct Int4Weight {
  const uint8_t* q;
  const float* s;
  const uint8_t* z;
  int64_t k, group;
};
void dequant_int4(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst);
// The same values for group % 128 == 0 and len % 128 == 0, each 128 of a row in the K order gemm(k4 = true)
// packs x in: position 32r + j (r < 4, j < 32) holds k = 4j + r (four lookups per 64-byte load).
void dequant_int4_k4(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst);

// int8: q [N, K], s float32 [N] (group 0) or [N, K/group] (group % 16 == 0).
struct Int8Weight {
  const int8_t* q;
  const float* s;
  int64_t k, group;
};
void dequant_int8(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst);

// Which brgemm gemm() runs on: none where torch lacks the bf16 brgemm, the CPU lacks AVX-512 BW/BF16, oneDNN is
// off (torch.backends.mkldnn) or the environment switch `env` ("DSATTN_INT4_AMX" / "DSATTN_INT8_AMX") is "0";
// AMX where the CPU has AMX-BF16 (cpublas::could_pack); otherwise AVX512-BF16 where torch's brgemm accepts the
// VNNI layout there (probed once; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 selects it on an AMX CPU).
enum class Kind { kNone, kAmx, kAvx512Bf16 };
Kind available(const char* env);

// out[m, n] (bf16 bits, row stride n) = x[m, :] . w[n, :] (+ bias[n]), fp32 accumulation, one rounding.
// x bf16 bits [m, k] with row stride ldx, unit column stride; k % 32 == 0 (k % 128 == 0 with k4: dequant's tiles
// are in dequant_int4_k4's K order). Parallel over N blocks; the result does not depend on the thread count.
void gemm(const uint16_t* x, int64_t ldx, int64_t m, int64_t n, int64_t k, DequantFn dequant, bool k4,
          const void* weight, const float* bias, uint16_t* out);

}  // namespace amx
}  // namespace dsattn
