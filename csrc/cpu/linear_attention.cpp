// torch.ops.dsattn_C.linear_attention on CPU tensors: the "cpp" backend of dsattn.linear_attention (forward
// only; the "elu", "relu" and "identity" feature maps). Checks the arguments and runs the chunked kernel of
// linear_attention_impl.h, compiled here once per ISA (AVX-512, AVX2 + FMA under GCC target pragmas, and the
// build's baseline), picked at run time by cpu_attn::dispatch_isa like the attention kernels. Tasks are
// (batch, q head) pairs over torch's intra-op threads; GQA maps q head h to kv head h / (Hq / Hkv).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/attention_args.h"
#include "cpu/aligned_buffer.h"
#include "cpu/isa_dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "cpu/isa_target.h"
#define DSATTN_LA_X86 1
#endif

namespace dsattn {
namespace linear_cpu {

// The op's feature_map argument (dsattn/ops/linear_attention.py passes these codes).
enum FeatureMap : int { kElu = 0, kRelu = 1, kIdentity = 2 };

struct LinArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  cpu_attn::Dtype dtype;
  const float* S0;  // [B, Hq, Dk, Dv] contiguous, or nullptr (zero)
  const float* z0;  // [B, Hq, Dk] contiguous, or nullptr
  float* S;         // the final state, same layouts
  float* z;
  int64_t batch, hq, hkv, sq, sk, dk, dv;
  int fmap;
  bool causal, normalize;
  float eps;
  int64_t qb, kb, vb, ob;  // batch strides
  cpu_attn::Strides qs, ks, vs, os;
};

// Scalar feature maps (the portable path and the vector paths' tails). NaN stays NaN.
inline float scalar_relu(float x) { return x < 0.f ? 0.f : x; }
inline float scalar_elu1(float x) { return x > 0.f ? x + 1.f : std::exp(x); }

namespace isa_portable {
using Tag = cpu_attn::isa_portable::Tag;
struct Vec {
  using reg = float;
  static constexpr int64_t W = 1;
  static constexpr int MR = 4;
  static inline reg load(const float* p) { return *p; }
  static inline void store(float* p, reg x) { *p = x; }
  static inline reg set1(float x) { return x; }
  static inline reg zero() { return 0.f; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg max0(reg x) { return scalar_relu(x); }
  static inline reg elu1(reg x) { return scalar_elu1(x); }
};
#include "cpu/linear_attention_impl.h"
}  // namespace isa_portable

#ifdef DSATTN_LA_X86
// e^x for x in [-87, 0] (elu's negative side): n = round(x log2 e), r = x - n ln 2 in two parts, e^r by its
// degree-7 Taylor polynomial (|r| <= 0.35: error below 1e-8), times 2^n. Below -87 it is 0; NaN stays NaN.
#define DSATTN_LA_EXP_POLY(FMA, SET1, r)                                                                   \
  FMA(FMA(FMA(FMA(FMA(FMA(FMA(SET1(1.f / 5040), r, SET1(1.f / 720)), r, SET1(1.f / 120)), r, SET1(1.f / 24)), \
                  r, SET1(1.f / 6)),                                                                        \
              r, SET1(0.5f)),                                                                               \
          r, SET1(1.f)),                                                                                    \
      r, SET1(1.f))

DSATTN_TARGET_PUSH("avx2,fma")
namespace isa_avx2 {
using Tag = cpu_attn::isa_avx2::Tag;
struct Vec {
  using reg = __m256;
  static constexpr int64_t W = 8;
  static constexpr int MR = 2;  // 2 x 4 accumulators + 4 loads of 16 ymm registers
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  // max/min return their second operand when either is NaN: x goes second.
  static inline reg max0(reg x) { return _mm256_max_ps(_mm256_setzero_ps(), x); }
  static inline reg exp_nonpositive(reg x) {
    const reg under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-87.f), x);
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    const reg p = DSATTN_LA_EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  static inline reg elu1(reg x) {
    const reg zero = _mm256_setzero_ps();
    return _mm256_add_ps(_mm256_max_ps(zero, x), exp_nonpositive(_mm256_min_ps(zero, x)));
  }
};
#include "cpu/linear_attention_impl.h"
}  // namespace isa_avx2
DSATTN_TARGET_POP()
DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,fma,avx2")
namespace isa_avx512 {
using Tag = cpu_attn::isa_avx512::Tag;
struct Vec {
  using reg = __m512;
  static constexpr int64_t W = 16;
  static constexpr int MR = 6;  // 6 x 4 accumulators + 4 loads of 32 zmm registers
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg max0(reg x) { return _mm512_max_ps(_mm512_setzero_ps(), x); }
  static inline reg exp_nonpositive(reg x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
    x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const reg p = DSATTN_LA_EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r);
    return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), p, n);
  }
  static inline reg elu1(reg x) {
    const reg zero = _mm512_setzero_ps();
    return _mm512_add_ps(_mm512_max_ps(zero, x), exp_nonpositive(_mm512_min_ps(zero, x)));
  }
};
#include "cpu/linear_attention_impl.h"
}  // namespace isa_avx512
DSATTN_TARGET_POP()
#undef DSATTN_LA_EXP_POLY
#endif  // DSATTN_LA_X86

// The per-ISA builds as overloads of one name, for dispatch_isa's tags.
using isa_portable::linear_attention;
#ifdef DSATTN_LA_X86
using isa_avx2::linear_attention;
using isa_avx512::linear_attention;
#else
// Only the baseline build here (resolve_isa picks nothing else).
template <typename Tag>
void linear_attention(Tag, const LinArgs& a) {
  linear_attention(isa_portable::Tag{}, a);
}
#endif

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& S0,
    const c10::optional<at::Tensor>& z0, int64_t feature_map, bool causal, bool normalize, double eps,
    int64_t isa) {
  const char* op = "dsattn_C::linear_attention: ";
  const auto [b, hq, sq, dk, hkv, sk, dv] = cpu_attn::checked_bhsd(q, k, v, op);
  TORCH_CHECK_VALUE(!causal || sq <= sk, op, "causal needs Sq <= Sk");
  TORCH_CHECK_VALUE(feature_map >= kElu && feature_map <= kIdentity, op,
                    "feature_map must be 0 (elu), 1 (relu) or 2 (identity), got ", feature_map);
  TORCH_CHECK_VALUE(S0.has_value() == z0.has_value(), op, "S0 and z0 go together");
  if (S0.has_value()) {
    for (const at::Tensor* t : {&*S0, &*z0})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(), op,
                  "S0, z0 must be contiguous float32 CPU tensors");
    TORCH_CHECK_VALUE(S0->sizes() == at::IntArrayRef({b, hq, dk, dv}) && z0->sizes() == at::IntArrayRef({b, hq, dk}),
                      op, "S0 must be [B, Hq, Dk, Dv] and z0 [B, Hq, Dk]");
  }
  at::Tensor out = at::empty({b, hq, sq, dv}, q.options());
  at::Tensor S = at::empty({b, hq, dk, dv}, q.options().dtype(at::kFloat));
  at::Tensor z = at::empty({b, hq, dk}, q.options().dtype(at::kFloat));
  if (b * hq == 0) return {out, S, z};
  LinArgs a;
  cpu_attn::set_qkvo_bhsd(a, q, k, v, out, "linear_attention");
  a.S0 = S0.has_value() ? S0->data_ptr<float>() : nullptr;
  a.z0 = z0.has_value() ? z0->data_ptr<float>() : nullptr;
  a.S = S.data_ptr<float>();
  a.z = z.data_ptr<float>();
  a.batch = b;
  a.hq = hq;
  a.hkv = hkv;
  a.sq = sq;
  a.sk = sk;
  a.dk = dk;
  a.dv = dv;
  a.fmap = static_cast<int>(feature_map);
  a.causal = causal;
  a.normalize = normalize;
  a.eps = static_cast<float>(eps);
  cpu_attn::dispatch_isa(isa, [&](auto tag) { linear_attention(tag, a); });
  return {out, S, z};
}

}  // namespace
}  // namespace linear_cpu

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("linear_attention", &linear_cpu::linear_attention_cpu); }

}  // namespace dsattn
