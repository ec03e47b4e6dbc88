// int4 weights x int8 digits of the activations by AVX512-VNNI (VPDPBUSD: u8 x s8, four products summed into
// each int32 lane): decode and small M (int4_matmul.cpp picks it where the CPU has VNNI; see int4_kernels.h).
//
// Per 128 values of K (one 64-byte load of packed weights per row): low nibbles = bytes & 15 (the even K
// values), high nibbles = (bytes >> 4) & 15 (the odd ones), both already the u8 operand; the s8 operand is the
// activation digit block of the same parity. Digits are folded in int32 per block (acc << 7 between digits:
// at most 15 * 127 * 8 * 2^14 < 2^31 per lane), converted once to fp32 and scaled by sx (per row and block)
// and s (per lane: each 32-bit lane covers 8 consecutive K values, inside one group as group % 32 == 0).
// Accuracy: with three digits (fp32 x) |x - sx * (d0 + d1 / 2^7 + d2 / 2^14)| <= 2^-15 sx (2.4e-7 of the
// block's largest |x|, about fp32's own rounding of the products); with two (bf16 x) <= 2^-8 sx (3.1e-5 of it,
// far below bf16's 2^-9 relative rounding of x itself). The digit arithmetic is exact (|u - d| <= 1/2 scaled
// by powers of two); the only other rounding is u = x / sx in fp32.
// Zero points: sum_k (q - z) s x = s (sum q x) - s z (sum x), the second from exact fp32 group sums of x.
// Memory: the packed weight streams from L3 once per call (a row tile reads NB rows of K / 2 bytes side by
// side, short streams the hardware prefetcher ramps up late), so each 64-byte load also prefetches the same
// offset of the next tile's rows into L1: that tile is read right after this one.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/int4_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu/isa_target.h"

DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,avx2")

#include "cpu/int_tile_schedule.h"  // compiled for the target above
#include "cpu/vnni_quantize.h"

namespace dsattn {
namespace int4_cpu {
namespace vnni {
namespace {

constexpr int kNB = 4;  // weight rows per tile

template <int L, int R, int NB>
inline void tile(const VnniArgs& a, int64_t r0, int64_t n0) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t blocks = a.k / 128, groups = a.k / a.group, row_bytes = a.k / 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const bool wide = a.group % 128 == 0;
  // 128 % group == 0: lane i (K values 8i .. 8i + 7 of the block) takes the block's group 8i / group.
  const __m512i lane_group = _mm512_srli_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                     10, 11, 12, 13, 14, 15),
                                                                    _mm512_set1_epi32(8)),
                                               wide ? 0 : __builtin_ctzll(static_cast<uint64_t>(a.group)));
  const __mmask16 gmask = wide ? 1 : static_cast<__mmask16>((1u << (128 / a.group)) - 1);
  // The next tile's rows (this tile's again at the end of N: prefetches never leave the weight).
  const uint8_t* next = a.q + (n0 + 2 * NB <= a.n ? n0 + NB : n0) * row_bytes;
  // Group of block c, c * 128 / group, counted instead of divided per block.
  const int64_t per_block = wide ? 0 : 128 / a.group, blocks_per_group = wide ? a.group / 128 : 1;
  int64_t g0 = 0, in_group = 0;
  for (int64_t c = 0; c < blocks; ++c) {
    __m512i lo[NB], hi[NB];
    __m512 s[NB];
    for (int j = 0; j < NB; ++j) {
      const __m512i w = _mm512_loadu_si512(a.q + (n0 + j) * row_bytes + 64 * c);
      _mm_prefetch(reinterpret_cast<const char*>(next + j * row_bytes + 64 * c), _MM_HINT_T0);
      lo[j] = _mm512_and_si512(w, nib);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
      const float* sp = a.s + (n0 + j) * groups + g0;
      s[j] = wide ? _mm512_set1_ps(*sp) : _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(gmask, sp));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.xq + ((r0 + r) * blocks + c) * L * 128;
      const __m512 sx = _mm512_set1_ps(a.sx[(r0 + r) * blocks + c]);
      __m512i d[2 * L];
      for (int l = 0; l < 2 * L; ++l) d[l] = _mm512_loadu_si512(xq + 64 * l);
      for (int j = 0; j < NB; ++j) {
        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[j], d[0]);
        t = _mm512_dpbusd_epi32(t, hi[j], d[1]);
        for (int l = 1; l < L; ++l) {
          t = _mm512_slli_epi32(t, 7);
          t = _mm512_dpbusd_epi32(t, lo[j], d[2 * l]);
          t = _mm512_dpbusd_epi32(t, hi[j], d[2 * l + 1]);
        }
        acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(t), sx), s[j], acc[r][j]);
      }
    }
    if (wide) {
      if (++in_group == blocks_per_group) in_group = 0, ++g0;
    } else {
      g0 += per_block;
    }
  }
  // Zero-point terms sum_g s z xsum, 16 groups per vector (masked tail).
  for (int j = 0; j < NB; ++j) {
    const int64_t row = n0 + j;
    __m512 zt[R];
    for (int r = 0; r < R; ++r) zt[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mask = groups - g >= 16 ? static_cast<__mmask16>(0xFFFF)
                                              : static_cast<__mmask16>((1u << (groups - g)) - 1);
      const __m512 sz = _mm512_mul_ps(
          _mm512_maskz_loadu_ps(mask, a.s + row * groups + g),
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, a.z + row * groups + g))));
      for (int r = 0; r < R; ++r)
        zt[r] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, a.xsum + (r0 + r) * groups + g), zt[r]);
    }
    for (int r = 0; r < R; ++r)
      a.out[(r0 + r) * a.n + row] = _mm512_reduce_add_ps(acc[r][j]) - _mm512_reduce_add_ps(zt[r]) +
                                    (a.bias != nullptr ? a.bias[row] : 0.f);
  }
}

template <int L>
void run(const VnniArgs& a) {
  tile_schedule::run<kNB, 2, 1>(a.m, a.n, [&](auto r, auto nb, int64_t r0, int64_t n0) {
    tile<L, decltype(r)::value, decltype(nb)::value>(a, r0, n0);
  });
}

}  // namespace

bool compiled() { return true; }

bool supported() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

void quantize_x(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t group, int levels, int8_t* xq,
                float* sx, float* xsum) {
  vnni_quant::quantize_x<true>(x, ldx, m, k, group, levels, xq, sx, xsum);
}

void matmul(const VnniArgs& a, int levels) {
  if (levels == 3) {
    run<3>(a);
  } else if (levels == 2) {
    run<2>(a);
  } else {
    run<1>(a);
  }
}

}  // namespace vnni
}  // namespace int4_cpu
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // not x86-64 with GCC/clang: never selected

namespace dsattn {
namespace int4_cpu {
namespace vnni {
bool compiled() { return false; }
bool supported() { return false; }
void quantize_x(const float*, int64_t, int64_t, int64_t, int64_t, int, int8_t*, float*, float*) {}
void matmul(const VnniArgs&, int) {}
}  // namespace vnni
}  // namespace int4_cpu
}  // namespace dsattn

#endif

namespace dsattn {
namespace int4_cpu {
namespace vnni {
bool eligible(int64_t k, int64_t group) {
  return group % 32 == 0 && k % 128 == 0 && (group % 128 == 0 || 128 % group == 0);
}
}  // namespace vnni
}  // namespace int4_cpu
}  // namespace dsattn
