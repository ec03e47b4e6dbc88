// int8 weights x int8 digits of the activations by AVX512-VNNI (VPDPBUSD: u8 x s8, four products summed into
// each int32 lane): decode (int8_matmul.cpp picks it for M < kVnniMaxRows where the CPU has VNNI).
//
// x as int8 digits per block of 128 values of K (vnni_quantize.h: 3 for fp32 x, 2 for bf16 x; the accuracy
// int4_matmul_vnni.cpp states). VPDPBUSD's u8 operand is the weight code + 128 (q ^ 0x80); the s8 one the digit.
// Digits are folded in int32 per block (acc << 7 between digits) and the offset removed by subtracting the
// same fold of 128 x digits (VPDPBUSD of 0x80 bytes with the digits, once per row of x and block). The
// intermediate sums wrap in int32, but every step is linear modulo 2^32 and the true per-lane value
// sum q D (8 products, |q| <= 128, |D| <= 127 2^14 + 64 2^7 + 64) stays below 2^31: the difference is exact.
// Then converted once to fp32 per block and scaled by sx (per row of x and block) and the weight scale (per
// channel, or per group: group % 128 == 0, one group per block).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu/isa_target.h"

DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,avx2")

#include "cpu/int_tile_schedule.h"  // compiled for the target above
#include "cpu/vnni_quantize.h"

namespace dsattn {
namespace int8_vnni {
namespace {

constexpr int kNB = 4;  // weight rows per tile

struct Args {
  const int8_t* xq;  // [m, k / 128, L, 128]
  const float* sx;   // [m, k / 128]
  const int8_t* q;   // [n, k]
  const float* s;    // [n] (group 0) or [n, k / group]
  const float* bias;
  float* out;  // [m, n]
  int64_t m, n, k, group;
};

template <int L, int R, int NB>
inline void tile(const Args& a, int64_t r0, int64_t n0) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t blocks = a.k / 128, groups = a.group > 0 ? a.k / a.group : 1;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < blocks; ++c) {
    const int64_t g = a.group > 0 ? c * 128 / a.group : 0;
    __m512i w[NB][2];
    __m512 s[NB];
    for (int j = 0; j < NB; ++j) {
      const int8_t* qp = a.q + (n0 + j) * a.k + 128 * c;
      w[j][0] = _mm512_xor_si512(_mm512_loadu_si512(qp), flip);
      w[j][1] = _mm512_xor_si512(_mm512_loadu_si512(qp + 64), flip);
      s[j] = _mm512_set1_ps(a.s[(n0 + j) * groups + g]);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.xq + ((r0 + r) * blocks + c) * L * 128;
      const __m512 sx = _mm512_set1_ps(a.sx[(r0 + r) * blocks + c]);
      __m512i d[2 * L];
      for (int l = 0; l < 2 * L; ++l) d[l] = _mm512_loadu_si512(xq + 64 * l);
      __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, d[0]);
      corr = _mm512_dpbusd_epi32(corr, flip, d[1]);
      for (int l = 1; l < L; ++l) {
        corr = _mm512_slli_epi32(corr, 7);
        corr = _mm512_dpbusd_epi32(corr, flip, d[2 * l]);
        corr = _mm512_dpbusd_epi32(corr, flip, d[2 * l + 1]);
      }
      for (int j = 0; j < NB; ++j) {
        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[j][0], d[0]);
        t = _mm512_dpbusd_epi32(t, w[j][1], d[1]);
        for (int l = 1; l < L; ++l) {
          t = _mm512_slli_epi32(t, 7);
          t = _mm512_dpbusd_epi32(t, w[j][0], d[2 * l]);
          t = _mm512_dpbusd_epi32(t, w[j][1], d[2 * l + 1]);
        }
        t = _mm512_sub_epi32(t, corr);
        acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sx), s[j], acc[r][j]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t row = n0 + j;
    for (int r = 0; r < R; ++r)
      a.out[(r0 + r) * a.n + row] = _mm512_reduce_add_ps(acc[r][j]) + (a.bias != nullptr ? a.bias[row] : 0.f);
  }
}

template <int L>
void run(const Args& a) {
  tile_schedule::run<kNB, 2, 1>(a.m, a.n, [&](auto r, auto nb, int64_t r0, int64_t n0) {
    tile<L, decltype(r)::value, decltype(nb)::value>(a, r0, n0);
  });
}

}  // namespace

bool supported() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

void matmul(const float* x, int64_t ldx, int64_t m, int64_t n, int64_t k, const int8_t* q, const float* s,
            int64_t group, const float* bias, int levels, float* out) {
  const int64_t blocks = k / 128;
  std::vector<int8_t> xq(static_cast<size_t>(m * blocks * levels * 128));
  std::vector<float> sx(static_cast<size_t>(m * blocks));
  vnni_quant::quantize_x<false>(x, ldx, m, k, 128, levels, xq.data(), sx.data(), nullptr);
  const Args a{xq.data(), sx.data(), q, s, bias, out, m, n, k, group};
  if (levels == 3) {
    run<3>(a);
  } else {
    run<2>(a);
  }
}

}  // namespace int8_vnni
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // not x86-64 with GCC/clang: never selected

namespace dsattn {
namespace int8_vnni {
bool supported() { return false; }
void matmul(const float*, int64_t, int64_t, int64_t, int64_t, const int8_t*, const float*, int64_t, const float*,
            int, float*) {}
}  // namespace int8_vnni
}  // namespace dsattn

#endif
