// Activations as int8 digits for AVX512-VNNI dot products (int4_matmul_vnni.cpp, int8_matmul_vnni.cpp).
// Per block of 128 values of K: sx = max|x| / 127 and `levels` digits with x ~= sx (d0 + d1 / 2^7 + d2 / 2^14),
// |d0| <= 127, |d1|, |d2| <= 64 (each the rounded residual of the one before, times 2^7: exact in fp32).
// Include inside a region compiled for avx512f/bw/dq/vl (the including file's target pragma), after
// <immintrin.h>, <ATen/Parallel.h>, <algorithm>, <cmath> and <limits>.
#pragma once

namespace dsattn {
namespace vnni_quant {

// 128 values of x (fp32) -> `levels` digit blocks of 128 bytes at dst; returns max|x| / 127. kSplit: each
// digit block as the 64 even K values, then the 64 odd ones (int4's nibble order); otherwise in K order.
template <bool kSplit>
inline float quantize_block(const float* x, int levels, int8_t* dst) {
  __m512 v[8];
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;  // VMAXPS drops a NaN in its first operand: NaNs are tracked apart
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_loadu_ps(x + 16 * i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    nan |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
  }
  const float m = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
  if (!(m > 0.f) || !std::isfinite(m)) {
    // All zero: zero digits. NaN / Inf: scale NaN / Inf so that the output is not finite, as x @ w would be.
    std::fill(dst, dst + 128 * levels, int8_t{0});
    return m > 0.f || std::isnan(m) ? m : 0.f;
  }
  const __m512 inv = _mm512_set1_ps(127.f / m);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 base = _mm512_set1_ps(128.f);
  for (int i = 0; i < 8; ++i) {
    // kSplit: vector i holds parity i % 2 of values 32 (i / 2) .. 32 (i / 2) + 31, stored at 64 parity + 16 (i / 2).
    const int pair = i / 2, parity = i % 2;
    __m512 u = _mm512_mul_ps(
        kSplit ? _mm512_permutex2var_ps(v[2 * pair], parity ? odd : even, v[2 * pair + 1]) : v[i], inv);
    const int at = kSplit ? 64 * parity + 16 * pair : 16 * i;
    for (int l = 0; l < levels; ++l) {
      const __m512 d = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 128 * l + at), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(d)));
      u = _mm512_mul_ps(_mm512_sub_ps(u, d), base);  // exact: |u - d| <= 1/2, times a power of two
    }
  }
  return m / 127.f;
}

// x fp32 [m, k] (row stride ldx, k % 128 == 0) -> xq int8 [m, k / 128, levels, 128], sx [m, k / 128] (the
// scale of the last digit: sx * d folded as ((d0 2^7 + d1) 2^7 + d2) is x); xsum [m, k / group] (fp32 sums of
// x per group, group % 16 == 0) unless null.
template <bool kSplit>
inline void quantize_x(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group, int levels, int8_t* xq,
                       float* sx, float* xsum) {
  const int64_t blocks = k / 128;
  const float unit = levels == 3 ? 1.f / 16384.f : levels == 2 ? 1.f / 128.f : 1.f;
  at::parallel_for(0, m * blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / blocks, c = b % blocks;
      sx[b] = quantize_block<kSplit>(x + r * ldx + 128 * c, levels, xq + b * levels * 128) * unit;
    }
  });
  if (xsum == nullptr) return;
  const int64_t groups = k / group;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + r * ldx + g * group + i));
      xsum[r * groups + g] = _mm512_reduce_add_ps(acc);
    }
}

}  // namespace vnni_quant
}  // namespace dsattn
