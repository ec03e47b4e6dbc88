// The attention kernels (attention_impl.h) in plain C++ for the build's baseline ISA (any architecture): an
// 8-lane array type whose loops the compiler vectorizes as it can. The fallback when the CPU has neither
// AVX2 nor AVX-512, and a reference for the vector builds (tests force it with isa=0).
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

namespace dsattn {
namespace cpu_attn {
namespace isa_portable {

struct Vec {
  static constexpr int64_t W = 8;
  static constexpr int RM = 2;
  static constexpr bool kTranspose16 = false;  // K tiles are transposed element by element
#if defined(__GNUC__)
  // GCC/clang vector extension: the compiler lowers it to the baseline ISA's vectors (2 x SSE2 on x86-64).
  typedef float reg __attribute__((vector_size(W * sizeof(float))));
  static inline reg load(const float* p) {
    reg r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
  static inline void store(float* p, reg x) { __builtin_memcpy(p, &x, sizeof(x)); }
  static inline reg set1(float x) { return reg{} + x; }
  static inline reg zero() { return reg{}; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
#else
  struct reg {
    float v[W];
    float& operator[](int i) { return v[i]; }
    float operator[](int i) const { return v[i]; }
  };
  static inline reg load(const float* p) {
    reg r;
    for (int i = 0; i < W; ++i) r[i] = p[i];
    return r;
  }
  static inline void store(float* p, const reg& x) {
    for (int i = 0; i < W; ++i) p[i] = x[i];
  }
  static inline reg set1(float x) {
    reg r;
    for (int i = 0; i < W; ++i) r[i] = x;
    return r;
  }
  static inline reg zero() { return set1(0.f); }
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int i = 0; i < W; ++i) r[i] = a[i] * b[i] + c[i];
    return r;
  }
  static inline reg mul(const reg& a, const reg& b) { return fma(a, b, zero()); }
  static inline reg add(const reg& a, const reg& b) { return fma(a, set1(1.f), b); }
  static inline reg sub(const reg& a, const reg& b) { return fma(b, set1(-1.f), a); }
  static inline reg max(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < W; ++i) r[i] = a[i] > b[i] ? a[i] : b[i];
    return r;
  }
#endif
  static inline float reduce_max(const reg& x) {
    float m = x[0];
    for (int i = 1; i < W; ++i) m = x[i] > m ? x[i] : m;
    return m;
  }
  static inline float reduce_add(const reg& x) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += x[i];
    return s;
  }
  static inline reg exp(const reg& x) {
    reg r;
    for (int i = 0; i < W; ++i) r[i] = std::exp(x[i]);
    return r;
  }
};

#include "cpu/attention_impl.h"
#include "cpu/hybrid_attention_impl.h"

// W int8 codes as fp32 (exact).
static inline Vec::reg q8_load(const int8_t* p) {
  float t[Vec::W];
  for (int64_t i = 0; i < Vec::W; ++i) t[i] = static_cast<float>(p[i]);
  return Vec::load(t);
}
#include "cpu/int8_matmul_impl.h"

}  // namespace isa_portable
}  // namespace cpu_attn
}  // namespace dsattn
