// The int4 weight kernels' per-ISA entry points (int4_matmul_avx512.cpp), called by int4_matmul.cpp after
// resolve_isa(). Raw pointers only: the ISA file includes no tensor headers.
#pragma once

#include <cstdint>

namespace dsattn {
namespace int4_cpu {

// out[M, N] (row stride n) = x[M, K] @ ((q - z) * s)[N, K].T (+ bias). q: the packed words [N, K/8] (element k
// in bits 4 (k % 8) of word k / 8, so byte k / 2 holds k in its low nibble for even k, high for odd k);
// s float32 / z uint8 [N, K/group]. x is in the nibble order of pair_x() (row stride ldx), fp32.
struct Args {
  const float* x;
  int64_t ldx;
  const uint8_t* q;
  const float* s;
  const uint8_t* z;
  const float* bias;  // [N] or nullptr
  float* out;
  int64_t m, n, k, group;
};

// x rows in the order the AVX-512 kernel reads them: per 32 values of K, the 16 even ones, then the 16 odd
// ones (the low and high nibbles of 16 packed bytes). K % 32 == 0.
void pair_x(const float* x, int64_t ldx_in, int64_t m, int64_t k, float* dst);

// int4_matmul_vnni.cpp: x split into `levels` int8 digits per block of 128 values of K (row r, block c:
// x ~= sx[r, c] * (d0 + d1 / 2^7 + d2 / 2^14), d0 in [-127, 127], d1, d2 in [-64, 64]), the 4-bit codes times
// the digits by VPDPBUSD in exact int32, and per block and lane the fp32 scales. xq: per (row, block, digit)
// 128 bytes, the digits of the 64 even values of K, then the 64 odd ones (the low and high nibbles of 64 packed
// bytes); sx: per (row, block), already divided by 2^(7 (levels - 1)); xsum [M, K/group]: sums of x per group
// (the zero-point term, s * z * sum x).
struct VnniArgs {
  const int8_t* xq;
  const float* sx;
  const float* xsum;
  const uint8_t* q;
  const float* s;
  const uint8_t* z;
  const float* bias;
  float* out;
  int64_t m, n, k, group;
};

namespace avx512 {
bool compiled();
// group % 32 == 0 (so K % 32 == 0); x from pair_x().
void matmul(const Args& a);
// Weight rows [n0, n0 + rows) dequantized, (q - z) * s in fp32 (the oracle's values), into dst [rows, K] as
// fp32 (dst_f32) or rounded to nearest-even bfloat16 bits (dst_bf16, what .to(torch.bfloat16) gives); group %
// 32 == 0. Parallel over rows.
void dequant_rows(const uint8_t* q, const float* s, const uint8_t* z, int64_t n0, int64_t rows, int64_t k,
                  int64_t group, float* dst_f32, uint16_t* dst_bf16);
// int8_matmul's panels: int8 rows [n0, n0 + rows) of q [N, K] times s (per row: group 0; per group: group % 16
// == 0) in fp32, into dst as fp32 or nearest-even bf16 bits, as dequant_rows. Parallel over rows.
void dequant_int8_rows(const int8_t* q, const float* s, int64_t n0, int64_t rows, int64_t k, int64_t group,
                       float* dst_f32, uint16_t* dst_bf16);
}  // namespace avx512

namespace vnni {
bool compiled();
// The CPU has AVX512-VNNI (and the AVX-512 set of resolve_isa's avx512).
bool supported();
// VnniArgs' preconditions: K % 128 == 0 and (group % 128 == 0 or 128 % group == 0), group % 32 == 0.
bool eligible(int64_t k, int64_t group);
// x fp32 [M, K] (row stride ldx) -> xq [M, K/128, levels, 128] int8, sx [M, K/128], xsum [M, K/group].
void quantize_x(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group, int levels, int8_t* xq,
                float* sx, float* xsum);
void matmul(const VnniArgs& a, int levels);
}  // namespace vnni

}  // namespace int4_cpu
}  // namespace dsattn
