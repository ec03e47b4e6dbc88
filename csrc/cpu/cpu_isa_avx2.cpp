// The attention kernels (attention_impl.h) built for AVX2 + FMA: 8 fp32 lanes, 2 x 4 register tiles (16 ymm
// registers). As cpu_isa_avx512.cpp: ATen/c10 included before the target pragma.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/aligned_buffer.h"
#include "cpu/attention_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu/isa_target.h"

DSATTN_TARGET_PUSH("avx2,fma")

namespace dsattn {
namespace cpu_attn {
namespace isa_avx2 {

struct Vec {
  using reg = __m256;
  static constexpr int64_t W = 8;
  static constexpr int RM = 2;
  static constexpr bool kTranspose16 = false;  // K tiles are transposed element by element
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline float reduce_max(reg x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static inline float reduce_add(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  // As isa_avx512's exp.
  static inline reg exp(reg x) {
    const reg under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365447505f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365447505f), x);
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    reg p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_setzero_ps(), under);
  }
};

#include "cpu/attention_impl.h"
#include "cpu/hybrid_attention_impl.h"

// 8 int8 codes sign-extended to int32 and converted (exact).
static inline __m256 q8_load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#include "cpu/int8_matmul_impl.h"

}  // namespace isa_avx2
}  // namespace cpu_attn
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // not x86-64 with GCC/clang: never selected

namespace dsattn {
namespace cpu_attn {
namespace isa_avx2 {
void sliding_window(Tag, const SlidingArgs&) {}
void sparse(Tag, const SparseArgs&) {}
void int8_matmul(Tag, const Int8Args&) {}
void hybrid(Tag, const HybridArgs&) {}
bool compiled() { return false; }
}  // namespace isa_avx2
}  // namespace cpu_attn
}  // namespace dsattn

#endif
