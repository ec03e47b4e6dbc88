// int4 weight x fp32 activations for AVX-512 (F/BW/VL): decode and small M (int4_matmul.cpp picks it).
//
// Exact like the oracle: each weight is (q - z) * s rounded once to fp32 and multiplied with fp32 x, fp32
// accumulation. The 16 possible weights of a (row, group) form one register (table[q] = (q - z) * s), so a
// nibble becomes its weight by one vpermps on its 32-bit lane (which reads only the index's low 4 bits): 16
// packed bytes -> vpmovzxbd -> low nibbles are the lanes as they are, high nibbles the lanes >> 4; no masks, no
// int -> float conversion, no zero-point term. x comes in pair_x() order (even K values, then odd), so the two
// lookups meet their x values with plain loads.
// Tiles: NB weight rows x R rows of x; each 16-byte load and its lookups are shared by the R rows. Per 64 bytes
// of a row, the same offset of the next tile's rows is prefetched into L1 (see int4_matmul_vnni.cpp).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/int4_kernels.h"

namespace dsattn {
namespace int4_cpu {

void pair_x(const float* x, int64_t ldx_in, int64_t m, int64_t k, float* dst) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < k; b += 32)
      for (int64_t i = 0; i < 16; ++i) {
        dst[r * k + b + i] = x[r * ldx_in + b + 2 * i];
        dst[r * k + b + 16 + i] = x[r * ldx_in + b + 2 * i + 1];
      }
}

}  // namespace int4_cpu
}  // namespace dsattn

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu/isa_target.h"

DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")

#include "cpu/int_tile_schedule.h"  // compiled for the target above

namespace dsattn {
namespace int4_cpu {
namespace avx512 {
namespace {

constexpr int kNB = 4;  // weight rows per tile

template <int R, int NB>
inline void tile(const Args& a, int64_t r0, int64_t n0) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t groups = a.k / a.group, row_bytes = a.k / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float* x = a.x + r0 * a.ldx;
  const uint8_t* next = a.q + (n0 + 2 * NB <= a.n ? n0 + NB : n0) * row_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 table[NB];
    for (int j = 0; j < NB; ++j) {
      const int64_t i = (n0 + j) * groups + g;
      table[j] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(a.z[i]))),
                               _mm512_set1_ps(a.s[i]));
    }
    for (int64_t kk = g * a.group; kk < (g + 1) * a.group; kk += 32) {
      __m512 lo[NB], hi[NB];
      for (int j = 0; j < NB; ++j) {
        const uint8_t* bytes = a.q + (n0 + j) * row_bytes + kk / 2;
        if (kk % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(next + j * row_bytes + kk / 2), _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
        lo[j] = _mm512_permutexvar_ps(v, table[j]);
        hi[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[j]);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xe = _mm512_loadu_ps(x + r * a.ldx + kk), xo = _mm512_loadu_ps(x + r * a.ldx + kk + 16);
        for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(hi[j], xo, _mm512_fmadd_ps(lo[j], xe, acc[r][j]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      a.out[(r0 + r) * a.n + n0 + j] =
          _mm512_reduce_add_ps(acc[r][j]) + (a.bias != nullptr ? a.bias[n0 + j] : 0.f);
}

}  // namespace

bool compiled() { return true; }

namespace {
// 16 fp32 -> 16 bf16 bits, round to nearest even (finite values).
inline __m256i to_bf16(__m512 v) {
  const __m512i i = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(i, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
}  // namespace

void dequant_int8_rows(const int8_t* q, const float* s, int64_t n0, int64_t rows, int64_t k, int64_t group,
                       float* dst_f32, uint16_t* dst_bf16) {
  const int64_t groups = group > 0 ? k / group : 1, kv = k / 16 * 16;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* qr = q + (n0 + r) * k;
      const float* sr = s + (n0 + r) * groups;
      for (int64_t kk = 0; kk < k; kk += 16) {
        const float sc = sr[group > 0 ? kk / group : 0];
        if (kk >= kv) {  // K % 16 tail (per channel only: groups are multiples of 16)
          for (int64_t i = kk; i < k; ++i) {
            const float v = static_cast<float>(qr[i]) * sc;
            if (dst_f32 != nullptr) {
              dst_f32[r * k + i] = v;
            } else {
              uint32_t bits;
              __builtin_memcpy(&bits, &v, 4);
              dst_bf16[r * k + i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
            }
          }
          break;
        }
        const __m512 v = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + kk)))),
            _mm512_set1_ps(sc));
        if (dst_f32 != nullptr) {
          _mm512_storeu_ps(dst_f32 + r * k + kk, v);
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst_bf16 + r * k + kk), to_bf16(v));
        }
      }
    }
  });
}

void dequant_rows(const uint8_t* q, const float* s, const uint8_t* z, int64_t n0, int64_t rows, int64_t k,
                  int64_t group, float* dst_f32, uint16_t* dst_bf16) {
  const int64_t groups = k / group, row_bytes = k / 2;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // lo holds the even K values, hi the odd ones: interleaved back into K order.
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = n0 + r;
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 zero = _mm512_set1_ps(static_cast<float>(z[row * groups + g]));
        const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, zero), _mm512_set1_ps(s[row * groups + g]));
        for (int64_t kk = g * group; kk < (g + 1) * group; kk += 32) {
          const uint8_t* bytes = q + row * row_bytes + kk / 2;
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
          const __m512 lo = _mm512_permutexvar_ps(v, table);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          const __m512 a = _mm512_permutex2var_ps(lo, first, hi), b = _mm512_permutex2var_ps(lo, second, hi);
          if (dst_f32 != nullptr) {
            _mm512_storeu_ps(dst_f32 + r * k + kk, a);
            _mm512_storeu_ps(dst_f32 + r * k + kk + 16, b);
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst_bf16 + r * k + kk), to_bf16(a));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst_bf16 + r * k + kk + 16), to_bf16(b));
          }
        }
      }
    }
  });
}

void matmul(const Args& a) {
  tile_schedule::run<kNB, 4, 2, 1>(a.m, a.n, [&](auto r, auto nb, int64_t r0, int64_t n0) {
    tile<decltype(r)::value, decltype(nb)::value>(a, r0, n0);
  });
}

}  // namespace avx512
}  // namespace int4_cpu
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // not x86-64 with GCC/clang: never selected

namespace dsattn {
namespace int4_cpu {
namespace avx512 {
bool compiled() { return false; }
void matmul(const Args&) {}
void dequant_rows(const uint8_t*, const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, float*,
                  uint16_t*) {}
void dequant_int8_rows(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*, uint16_t*) {}
}  // namespace avx512
}  // namespace int4_cpu
}  // namespace dsattn

#endif
