// CPU int4 GEMV / small GEMM: out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/g]) * s[n, k/g] (+ bias[n]).
// The ISA is resolve_isa()'s (DSATTN_CPU_ISA as for the attention kernels). Paths, parallel over output rows n:
// - AVX-512 with VNNI, K % 128 == 0 and group_size 32, 64 or a multiple of 128, fp32 x with M < kVnniMaxRows,
//   bf16 x below the bf16 GEMM paths: int4_matmul_vnni.cpp (x split into int8 digits per 128 values: 3 for
//   fp32 x, 2 for bf16 x; VPDPBUSD; error bounds in int4_kernels.h / the file).
// - AVX-512 otherwise and group_size % 32 == 0, M below the GEMM paths': int4_matmul_avx512.cpp (weights
//   looked up from a per-group table of the 16 dequantized values, exact fp32 products); its panel dequant
//   (straight to bf16 for bf16 x) feeds the GEMM paths.
// Otherwise (AVX2+FMA when the CPU has it, a portable scalar loop otherwise):
// - few rows of x (M < kBlockedMinRows, decode): per group s * (sum_k q x - z * sum_k x), one FMA per weight:
//   8 nibbles of a word are shifted into 8 int32 lanes, converted and multiplied with 8 x values. Each row of x
//   unpacks the words again, which is cheapest while M is small.
// - more rows: blocks of kRowBlock weight rows; per K chunk (whole groups, ~kChunk values) the block is
//   dequantized once into a small fp32 buffer ((q - z) * s, exactly the reference's weight) that stays in L1,
//   and a 2 x 4 register tile (2 rows of x, 4 weight rows: 8 vector accumulators, 6 loads per 8 FMAs) runs
//   over it for every pair of x rows. Vector partial sums live in a per-task buffer across chunks.
// - many rows (M >= kGemmMinRows, prefill): the weight is dequantized a panel of kPanelRows rows at a time
//   (all of K, fp32) and multiplied by torch's BLAS GEMM: dequant costs one pass over the panel, amortized
//   over M rows, and the GEMM runs at BLAS speed; memory O(kPanelRows x K), never the whole weight.
//   bfloat16 x takes bf16 panels and torch's bf16 GEMM (fp32 accumulation; oneDNN's AVX512-BF16/AMX kernels
//   where the CPU has them: 4.9x the fp32 GEMM at M=256, 4096x4096 on a Zen 4 core); the bias is added after
//   the GEMM's rounding to bf16; from kBf16GemmMinRows rows, as the bf16 GEMM is that much faster. bf16 x with
//   fewer rows runs the fp32 paths and is rounded once at the end.
// - bf16 x from amx::kMinRows rows on AVX-512 CPUs with AMX, and from kBf16GemmMinRows rows on AVX512-BF16
//   CPUs without it (Zen 4; brgemm_dequant.h; group_size % 32 == 0): the dequantization fused into oneDNN's
//   brgemm per weight tile, fp32 accumulation, the bias added in fp32 and one rounding; DSATTN_INT4_AMX=0 keeps
//   the decode and panel paths.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/brgemm_dequant.h"
#include "cpu/int4_kernels.h"

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


// VNNI digit kernel for fp32 x below this many rows of x: per row it runs three VPDPBUSD chains (one per digit)
// where the exact kernel runs two FMAs per 32 weights; the shared nibble unpack decides at 1-3 rows, from 4 rows
// the two are about even (measured). bf16 x (two digits) takes it at every row count below kBf16GemmMinRows:
// 1.2-1.4x the exact kernel at 4-15 rows (4096 x 4096 g128, measured).
constexpr int64_t kVnniMaxRows = 4;
constexpr int64_t kBlockedMinRows = 4;  // measured: below this the unpack-per-row path is faster
constexpr int64_t kRowBlock = 4;        // weight rows dequantized together (the register tile's width)
constexpr int64_t kChunk = 512;         // K values per chunk: 4 x 512 fp32 weights = 8 KiB of L1
constexpr int64_t kGemmMinRows = 64;    // from here dequantize panels + BLAS GEMM (see the file comment)
// bf16 x: from here bf16 panels + bf16 GEMM (4096x4096 g128 on a Zen 4 core: 16 rows 3.4 ms vs 4.8 in fp32;
// 63 rows 16.5 ms in fp32 vs 5.1 at 64 rows in bf16).
constexpr int64_t kBf16GemmMinRows = 16;
// Weight rows per dequantized panel: 256 x K (K=4096: 4 MiB fp32, 2 MiB bf16) stays in L2 between the dequant
// and the GEMM; a whole-weight panel measured slower (its writes go to memory).
constexpr int64_t kPanelRows = 256;

// One weight row, K range [k0, k0 + len) (whole groups): dst[i] = (q[row, k0 + i] - z) * s.
__attribute__((target("avx2,fma"))) void dequant_row_avx2(const uint32_t* qp, const float* sp, const uint8_t* zp,
                                                          int64_t row, int64_t k, int64_t k0, int64_t len,
                                                          int64_t group_size, float* dst) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  const int64_t groups = k / group_size;
  const uint32_t* words = qp + row * (k / 8) + k0 / 8;
  for (int64_t g0 = 0; g0 < len; g0 += group_size) {
    const int64_t g = (k0 + g0) / group_size;
    const __m256 s = _mm256_set1_ps(sp[row * groups + g]);
    const __m256 z = _mm256_set1_ps(static_cast<float>(zp[row * groups + g]));
    for (int64_t i = g0; i < g0 + group_size; i += 8) {
      const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(words[i / 8])), shifts), mask);
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z), s));
    }
  }
}

// rows [0, rows) of the block, K range [k0, k0 + len): wbuf[j * len + i] = (q[n0 + j, k0 + i] - z) * s;
// rows beyond `rows` are zero.
void dequant_block_avx2(const uint32_t* qp, const float* sp, const uint8_t* zp, int64_t n0, int64_t rows, int64_t k,
                        int64_t k0, int64_t len, int64_t group_size, float* wbuf) {
  for (int64_t j = 0; j < kRowBlock; ++j) {
    float* dst = wbuf + j * len;
    if (j < rows) {
      dequant_row_avx2(qp, sp, zp, n0 + j, k, k0, len, group_size, dst);
    } else {
      std::fill(dst, dst + len, 0.f);
    }
  }
}

// acc[(r * kRowBlock + j) * 8 ..] += 8-lane partial sums of x[r, :len] . wbuf[j, :len] for R rows of x.
template <int R>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t ldx, const float* wbuf, int64_t len,
                                                   float* acc) {
  __m256 a[R][kRowBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kRowBlock; ++j) a[r][j] = _mm256_loadu_ps(acc + (r * kRowBlock + j) * 8);
  for (int64_t i = 0; i < len; i += 8) {
    __m256 w[kRowBlock];
    for (int j = 0; j < kRowBlock; ++j) w[j] = _mm256_loadu_ps(wbuf + j * len + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
      for (int j = 0; j < kRowBlock; ++j) a[r][j] = _mm256_fmadd_ps(xv, w[j], a[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kRowBlock; ++j) _mm256_storeu_ps(acc + (r * kRowBlock + j) * 8, a[r][j]);
}

__attribute__((target("avx2,fma"))) float hsum_avx2(const float* v) {
  const __m256 acc = _mm256_loadu_ps(v);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Output rows [begin, end) for all M rows of x, by blocks of kRowBlock weight rows (see the file comment).
__attribute__((target("avx2,fma"))) void blocked_rows_avx2(const float* xp, const uint32_t* qp, const float* sp,
                                                           const uint8_t* zp, const float* bp, float* op, int64_t m,
                                                           int64_t n, int64_t k, int64_t group_size, int64_t begin,
                                                           int64_t end) {
  const int64_t chunk = std::max<int64_t>(1, kChunk / group_size) * group_size;  // whole groups
  std::vector<float> wbuf(kRowBlock * std::min(chunk, k));
  std::vector<float> acc(m * kRowBlock * 8);
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, end - n0);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k0 = 0; k0 < k; k0 += chunk) {
      const int64_t len = std::min(chunk, k - k0);
      dequant_block_avx2(qp, sp, zp, n0, rows, k, k0, len, group_size, wbuf.data());
      int64_t r = 0;
      for (; r + 2 <= m; r += 2) tile_avx2<2>(xp + r * k + k0, k, wbuf.data(), len, acc.data() + r * kRowBlock * 8);
      if (r < m) tile_avx2<1>(xp + r * k + k0, k, wbuf.data(), len, acc.data() + r * kRowBlock * 8);
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < rows; ++j)
        op[r * n + n0 + j] = hsum_avx2(acc.data() + (r * kRowBlock + j) * 8) + (bp != nullptr ? bp[n0 + j] : 0.f);
  }
}

// Weight rows [n0, n0 + rows) as fp32 (q - z) * s into panel [rows, K] (the blocked path's values).
void dequant_panel(const uint32_t* qp, const float* sp, const uint8_t* zp, int64_t n0, int64_t rows, int64_t k,
                   int64_t group_size, bool avx2, float* panel) {
  const int64_t groups = k / group_size;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = n0 + r;
      if (avx2) {
        dequant_row_avx2(qp, sp, zp, row, k, 0, k, group_size, panel + r * k);
        continue;
      }
      for (int64_t i = 0; i < k; ++i) {
        const int64_t g = i / group_size;
        const uint32_t q = (qp[row * (k / 8) + i / 8] >> (4 * (i % 8))) & 0xFu;
        panel[r * k + i] = (static_cast<float>(q) - static_cast<float>(zp[row * groups + g])) * sp[row * groups + g];
      }
    }
  });
}

}  // namespace

// x float32 or bfloat16 [M, K]; qweight int32 [N, K/8]; scales float32 [N, G]; zeros uint8 [N, G]; bias
// float32 [N] or none -> [M, N] in x's dtype.
namespace {
// digits: the VNNI path's int8 digits per activation (int4_kernels.h): 3 for fp32 x, 2 where x was bf16.
at::Tensor int4_matmul_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias,
                            int digits) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4_matmul: x must be float32 or bfloat16 [M, K]");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const cpu_attn::Isa isa = cpu_attn::resolve_isa(-1);
  // Rows of bf16 x from which the fused brgemm runs (none: never).
  amx::Kind fused = amx::Kind::kNone;
  if (bf16 && x.size(1) > 0 && group_size > 0 && group_size % 32 == 0 && isa == cpu_attn::kAvx512)
    fused = amx::available("DSATTN_INT4_AMX");
  const int64_t fused_min = fused == amx::Kind::kAmx          ? amx::kMinRows
                            : fused == amx::Kind::kAvx512Bf16 ? kBf16GemmMinRows
                                                              : std::numeric_limits<int64_t>::max();
  // decode sizes: the fp32 kernels, one rounding at the end
  if (bf16 && x.size(0) < std::min(kBf16GemmMinRows, fused_min))
    return int4_matmul_impl(x.to(at::kFloat), qweight, scales, zeros, group_size, bias, 2).to(at::kBFloat16);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "int4_matmul: qweight must be int32 [N, K/8]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kByte,
              "int4_matmul: scales must be float32 and zeros uint8");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == k, "int4_matmul: qweight [N, K/8] does not match K=", k);
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0 && k % group_size == 0,  // >= 8 first: never k % 0
              "int4_matmul: group_size must be a multiple of 8 dividing K");
  const int64_t groups = k / group_size, words_per_group = group_size / 8;
  TORCH_CHECK(scales.size(0) == n && scales.size(1) == groups && zeros.size(0) == n && zeros.size(1) == groups,
              "int4_matmul: scales/zeros must be [N, K/group_size]");
  const at::Tensor xc = x.contiguous(), qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                "int4_matmul: bias must be float32 [N]");
    bc = bias->contiguous();
    bp = bc.data_ptr<float>();
  }
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(qc.data_ptr<int32_t>());
  const float* sp = sc.data_ptr<float>();
  const uint8_t* zp = zc.data_ptr<uint8_t>();
  const bool avx2 = isa >= cpu_attn::kAvx2;
  if (m >= fused_min) {
    // Dequantization fused into the brgemm (int4_matmul_amx.cpp).
    const amx::Int4Weight w{reinterpret_cast<const uint8_t*>(qp), sp, zp, k, group_size};
    const bool k4 = group_size % 128 == 0;  // then k % 128 == 0 too
    amx::gemm(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), k, m, n, k,
              k4 ? amx::dequant_int4_k4 : amx::dequant_int4, k4, &w, bp,
              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  if (m >= (bf16 ? kBf16GemmMinRows : kGemmMinRows)) {
    // AVX-512: dequantized straight into the GEMM's dtype (bf16 x: a bf16 panel, no fp32 pass).
    const bool wide = isa == cpu_attn::kAvx512 && int4_cpu::avx512::compiled() && group_size % 32 == 0;
    const int64_t panel_rows = std::min(kPanelRows, n);
    at::Tensor panel = at::empty({panel_rows, k}, x.options().dtype(wide && bf16 ? at::kBFloat16 : at::kFloat));
    for (int64_t n0 = 0; n0 < n; n0 += panel_rows) {
      const int64_t rows = std::min(panel_rows, n - n0);
      at::Tensor w = panel.narrow(0, 0, rows);
      if (wide) {
        int4_cpu::avx512::dequant_rows(reinterpret_cast<const uint8_t*>(qp), sp, zp, n0, rows, k, group_size,
                                       bf16 ? nullptr : w.data_ptr<float>(),
                                       bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr);
      } else {
        dequant_panel(qp, sp, zp, n0, rows, k, group_size, avx2, w.data_ptr<float>());
      }
      at::Tensor part;
      if (bf16) {
        part = at::mm(xc, (w.scalar_type() == at::kBFloat16 ? w : w.to(at::kBFloat16)).t());
        if (bp != nullptr) part = at::add(part, bc.narrow(0, n0, rows).to(at::kBFloat16));
      } else {
        part = bp != nullptr ? at::addmm(bc.narrow(0, n0, rows), xc, w.t()) : at::mm(xc, w.t());
      }
      if (rows == n) return part;  // one panel: the GEMM's output is the result
      out.narrow(1, n0, rows).copy_(part);
    }
    return out;
  }
  float* op = out.data_ptr<float>();  // fp32 from here: bf16 x returned above
  const float* xp = xc.data_ptr<float>();
  // DSATTN_INT4_VNNI=0 keeps AVX-512 CPUs with VNNI on the exact-lookup kernel (tests, benchmarks).
  const char* vnni_env = std::getenv("DSATTN_INT4_VNNI");
  const bool vnni_off = vnni_env != nullptr && std::string(vnni_env) == "0";
  if (isa == cpu_attn::kAvx512 && !vnni_off && (m < kVnniMaxRows || digits == 2) && int4_cpu::vnni::compiled() &&
      int4_cpu::vnni::supported() && int4_cpu::vnni::eligible(k, group_size) && m > 0 && n > 0) {
    const int64_t blocks = k / 128;
    at::Tensor xq = at::empty({m, blocks, digits, 128}, x.options().dtype(at::kChar));
    at::Tensor sx = at::empty({m, blocks}, x.options());
    at::Tensor xsum = at::empty({m, groups}, x.options());
    int4_cpu::vnni::quantize_x(xp, k, m, k, group_size, digits, xq.data_ptr<int8_t>(), sx.data_ptr<float>(),
                               xsum.data_ptr<float>());
    int4_cpu::VnniArgs a{xq.data_ptr<int8_t>(), sx.data_ptr<float>(), xsum.data_ptr<float>(),
                         reinterpret_cast<const uint8_t*>(qp), sp, zp, bp, op, m, n, k, group_size};
    int4_cpu::vnni::matmul(a, digits);
    return out;
  }
  if (isa == cpu_attn::kAvx512 && int4_cpu::avx512::compiled() && group_size % 32 == 0 && m > 0 && n > 0) {
    at::Tensor paired = at::empty({m, k}, x.options());
    int4_cpu::pair_x(xp, k, m, k, paired.data_ptr<float>());
    int4_cpu::Args a{paired.data_ptr<float>(), k, reinterpret_cast<const uint8_t*>(qp), sp, zp, bp, op, m, n, k,
                     group_size};
    int4_cpu::avx512::matmul(a);
    return out;
  }
  if (avx2 && m >= kBlockedMinRows) {
    // Tasks of whole row blocks (grain: 4 blocks).
    const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
      blocked_rows_avx2(xp, qp, sp, zp, bp, op, m, n, k, group_size, b0 * kRowBlock, std::min(n, b1 * kRowBlock));
    });
    return out;
  }
  // Per (row of x, group): sum of x, for the zero-point term.
  at::Tensor xsum = at::empty({m, groups}, x.options());
  float* xs = xsum.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < group_size; ++i) acc += xp[r * k + g * group_size + i];
      xs[r * groups + g] = acc;
    }
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
        op[r * n + row] = acc + (bp != nullptr ? bp[row] : 0.f);
      }
    }
  });
  return out;
}
}  // namespace

at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  return int4_matmul_impl(x, qweight, scales, zeros, group_size, bias, 3);
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("int4_matmul", &dsattn::int4_matmul_cpu); }
