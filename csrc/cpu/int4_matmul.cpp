// CPU int4 GEMV / small GEMM: out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g].
// Per group: s * (sum_k q x - z * sum_k x), so the inner loop is one FMA per weight: 8 nibbles of a word are
// shifted into 8 int32 lanes, converted and multiplied with 8 x values (AVX2+FMA when the CPU has it).
// Parallel over output rows; each 4-bit row is read once per call and reused for all M rows of x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

namespace dsattn {
namespace {

float group_dot_scalar(const uint32_t* words, const float* x, int64_t n_words) {
  float acc = 0.f;
  for (int64_t j = 0; j < n_words; ++j) {
    const uint32_t w = words[j];
    for (int i = 0; i < 8; ++i) acc += static_cast<float>((w >> (4 * i)) & 0xFu) * x[8 * j + i];
  }
  return acc;
}

__attribute__((target("avx2,fma"))) float group_dot_avx2(const uint32_t* words, const float* x, int64_t n_words) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < n_words; j += 2) {  // two independent FMA chains
    __m256i q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(words[j])), shifts), mask);
    __m256i q1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(words[j + 1])), shifts), mask);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(x + 8 * j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(x + 8 * j + 8), acc1);
  }
  for (; j < n_words; ++j) {
    __m256i q0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(words[j])), shifts), mask);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(x + 8 * j), acc0);
  }
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

}  // namespace

// x float32 [M, K]; qweight int32 [N, K/8]; scales float32 [N, G]; zeros uint8 [N, G] -> float32 [M, N].
at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_matmul: x must be float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "int4_matmul: qweight must be int32 [N, K/8]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kByte,
              "int4_matmul: scales must be float32 and zeros uint8");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == k, "int4_matmul: qweight [N, K/8] does not match K=", k);
  TORCH_CHECK(group_size % 8 == 0 && k % group_size == 0, "int4_matmul: group_size must be a multiple of 8 dividing K");
  const int64_t groups = k / group_size, words_per_group = group_size / 8;
  TORCH_CHECK(scales.size(0) == n && scales.size(1) == groups && zeros.size(0) == n && zeros.size(1) == groups,
              "int4_matmul: scales/zeros must be [N, K/group_size]");
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  // Per (row of x, group): sum of x, for the zero-point term.
  at::Tensor xsum = at::empty({m, groups}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < group_size; ++i) acc += xp[r * k + g * group_size + i];
      xs[r * groups + g] = acc;
    }
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(qc.data_ptr<int32_t>());
  const float* sp = sc.data_ptr<float>();
  const uint8_t* zp = zc.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t* wrow = qp + row * (k / 8);
      for (int64_t r = 0; r < m; ++r) {
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint32_t* words = wrow + g * words_per_group;
          const float* xg = xp + r * k + g * group_size;
          const float dot = avx2 ? group_dot_avx2(words, xg, words_per_group)
                                 : group_dot_scalar(words, xg, words_per_group);
          acc += sp[row * groups + g] * (dot - static_cast<float>(zp[row * groups + g]) * xs[r * groups + g]);
        }
        op[r * n + row] = acc;
      }
    }
  });
  return out;
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn, CPU, m) { m.impl("int4_matmul", &dsattn::int4_matmul_cpu); }
