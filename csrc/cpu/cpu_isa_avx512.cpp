// The attention kernels (attention_impl.h) built for AVX-512 (F/BW/DQ/VL + FMA): 16 fp32 lanes, 4 x 4 register
// tiles. Everything ATen/c10 is included before the target pragma, so only this file's own functions (in
// namespace isa_avx512) carry AVX-512 code; resolve_isa() calls them only on CPUs that have it.
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

DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")

#include "cpu/transpose16x16.h"

namespace dsattn {
namespace cpu_attn {
namespace isa_avx512 {

struct Vec {
  using reg = __m512;
  static constexpr int64_t W = 16;
  static constexpr int RM = 4;
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline float reduce_max(reg x) { return _mm512_reduce_max_ps(x); }
  static inline float reduce_add(reg x) { return _mm512_reduce_add_ps(x); }
  // e^x = 2^n 2^f with n = round(x log2 e), f = x log2 e - n in [-1/2, 1/2] (two FMAs): 2^f by its degree-6
  // Taylor polynomial (relative error < 2e-7), 2^n by vscalefps. 0 below -87.3 (so e^-inf = 0) by the zeroing
  // mask; NaN stays NaN (the unordered compare keeps it, and min/max return their second operand when either
  // is NaN, so x goes second).
  static inline reg exp(reg x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365447505f), _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
    x = _mm512_max_ps(_mm512_set1_ps(-87.3365447505f), x);
    const reg l2e = _mm512_set1_ps(1.44269504088896341f);
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // log2 e's float rounding error added back (x up to 88 makes it visible)
    const reg f = _mm512_fmadd_ps(x, _mm512_set1_ps(1.9259629911e-8f), _mm512_fmsub_ps(x, l2e, n));
    reg p = _mm512_set1_ps(1.5403530393381610e-4f);  // ln2^k / k!, k = 6 .. 0
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(keep, p, n);
  }
  // 16 consecutive elements as fp32 (bf16: the bits shifted up; fp16: vcvtph2ps).
  static constexpr bool kTranspose16 = true;
  static inline reg load16(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg load16(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline reg load16(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // r[i] = row i of a 16 x 16 block -> r[c] = column c.
  static inline void transpose16(reg r[16]) { transpose16x16(r); }
};

#include "cpu/attention_impl.h"
#include "cpu/hybrid_attention_impl.h"

// 16 int8 codes sign-extended to int32 and converted (exact).
static inline __m512 q8_load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#include "cpu/int8_matmul_impl.h"

}  // namespace isa_avx512
}  // namespace cpu_attn
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // not x86-64 with GCC/clang: never selected

namespace dsattn {
namespace cpu_attn {
namespace isa_avx512 {
void sliding_window(Tag, const SlidingArgs&) {}
void sparse(Tag, const SparseArgs&) {}
void int8_matmul(Tag, const Int8Args&) {}
void hybrid(Tag, const HybridArgs&) {}
bool compiled() { return false; }
}  // namespace isa_avx512
}  // namespace cpu_attn
}  // namespace dsattn

#endif
