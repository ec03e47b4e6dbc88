// torch.ops.dsattn_C.lightning_indexer_topk on CPU tensors: the "cpp" backend of dsattn.lightning_indexer_topk,
// scores and top-k fused. score[b,i,j] = sum_h w[b,i,h] * relu(q[b,i,h,:] . k[b,j,:]) (the caller folds the
// softmax scale into q or w). Keys are packed once, transposed in blocks of 64 ([D][64] fp32), so each q element
// is broadcast against 4 vectors of keys; a task is a few query rows, whose scores of every key block they see
// are kept in a [rows][Sk] buffer (never [Sq, Sk]) and then selected per row by the radix top-k of topk_select
// (ties to the lower index, highest first, -1 past the visible keys). Keys after a row's causal position are
// never scored for it beyond its last key block and never read by its selection.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/aligned_buffer.h"
#include "cpu/topk_select_row.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSATTN_LIT_AVX512 1
#endif

namespace dsattn {
namespace {

constexpr int64_t KB = 64;  // keys per packed block
constexpr int64_t RB = 4;   // query rows per task

// out[0..KB) = sum_h w[h] * relu(q[h] . Kt[:, j]) over one packed block Kt [D][KB].
void block_scores_portable(const float* q, const float* w, const float* kt, int64_t hi, int64_t d, float* out) {
  float tot[KB] = {0.f};
  for (int64_t h = 0; h < hi; ++h) {
    float acc[KB] = {0.f};
    for (int64_t e = 0; e < d; ++e) {
      const float qv = q[h * d + e];
      const float* kr = kt + e * KB;
      for (int64_t c = 0; c < KB; ++c) acc[c] += qv * kr[c];
    }
    for (int64_t c = 0; c < KB; ++c) tot[c] += w[h] * (acc[c] > 0.f || acc[c] != acc[c] ? acc[c] : 0.f);
  }
  std::copy(tot, tot + KB, out);
}

#ifdef DSATTN_LIT_AVX512
// Two heads at a time: 8 accumulators, 4 key vectors loaded per q element. max(0, x) keeps NaN (the second
// operand is returned when either is NaN), as relu does.
__attribute__((target("avx512f,avx512vl,fma"))) void block_scores_avx512(const float* q, const float* w,
                                                                           const float* kt, int64_t hi, int64_t d,
                                                                           float* out) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 tot[4] = {zero, zero, zero, zero};
  int64_t h = 0;
  for (; h + 2 <= hi; h += 2) {
    __m512 a[4] = {zero, zero, zero, zero}, b[4] = {zero, zero, zero, zero};
    const float* q0 = q + h * d;
    const float* q1 = q0 + d;
    for (int64_t e = 0; e < d; ++e) {
      const float* kr = kt + e * KB;
      const __m512 x = _mm512_set1_ps(q0[e]), y = _mm512_set1_ps(q1[e]);
      for (int c = 0; c < 4; ++c) {
        const __m512 kv = _mm512_loadu_ps(kr + c * 16);
        a[c] = _mm512_fmadd_ps(x, kv, a[c]);
        b[c] = _mm512_fmadd_ps(y, kv, b[c]);
      }
    }
    const __m512 wa = _mm512_set1_ps(w[h]), wb = _mm512_set1_ps(w[h + 1]);
    for (int c = 0; c < 4; ++c) {
      tot[c] = _mm512_fmadd_ps(wa, _mm512_max_ps(zero, a[c]), tot[c]);
      tot[c] = _mm512_fmadd_ps(wb, _mm512_max_ps(zero, b[c]), tot[c]);
    }
  }
  if (h < hi) {
    __m512 a[4] = {zero, zero, zero, zero};
    const float* q0 = q + h * d;
    for (int64_t e = 0; e < d; ++e) {
      const __m512 x = _mm512_set1_ps(q0[e]);
      for (int c = 0; c < 4; ++c) a[c] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kt + e * KB + c * 16), a[c]);
    }
    const __m512 wa = _mm512_set1_ps(w[h]);
    for (int c = 0; c < 4; ++c) tot[c] = _mm512_fmadd_ps(wa, _mm512_max_ps(zero, a[c]), tot[c]);
  }
  for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + c * 16, tot[c]);
}
#endif

at::Tensor lightning_indexer_topk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, int64_t top_k,
                                      bool causal, int64_t isa) {
  const char* op = "dsattn_C::lightning_indexer_topk: ";
  for (const at::Tensor* t : {&q, &k, &w}) {
    TORCH_CHECK(t->device().is_cpu(), op, "CPU tensors only");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, "q, k, weights must be float32");
    TORCH_CHECK(t->is_contiguous(), op, "q, k, weights must be contiguous");
  }
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 3 && w.dim() == 3, op, "q [B, Sq, Hi, D], k [B, Sk, D], weights [B, Sq, Hi]");
  const int64_t b = q.size(0), sq = q.size(1), hi = q.size(2), d = q.size(3), sk = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == b && k.size(2) == d && w.size(0) == b && w.size(1) == sq && w.size(2) == hi, op,
                    "q, k, weights shapes disagree");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= INT32_MAX && sk <= INT32_MAX, op, "top_k must be in [1, 2^31), Sk < 2^31");
  const bool wide = cpu_attn::resolve_isa(isa) == cpu_attn::kAvx512;
  at::Tensor out = at::empty({b, sq, top_k}, q.options().dtype(at::kInt));
  int32_t* out_ptr = out.data_ptr<int32_t>();
  if (out.numel() == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t nblk = (sk + KB - 1) / KB;
  // 1. Keys transposed per block of KB: kt[b][blk][D][KB], zero past Sk.
  ScratchVec<float> kt(static_cast<size_t>(b * nblk * d * KB), 0.f);
  at::parallel_for(0, b * nblk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bi = u / nblk, blk = u % nblk;
      float* dst = kt.data() + u * d * KB;
      for (int64_t jj = 0; jj < KB && blk * KB + jj < sk; ++jj) {
        const float* src = kp + (bi * sk + blk * KB + jj) * d;
        for (int64_t e = 0; e < d; ++e) dst[e * KB + jj] = src[e];
      }
    }
  });
  // 2. Tasks of RB rows claimed from a counter (later rows see more keys: no static split).
  const int64_t nrb = (sq + RB - 1) / RB, total = b * nrb;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    ScratchVec<float> scores(static_cast<size_t>(RB * nblk * KB));
    topk_cpu::Scratch sc;
    for (int64_t t = next.fetch_add(1); t < total; t = next.fetch_add(1)) {
      const int64_t bi = t / nrb, i0 = (t % nrb) * RB, nr = std::min(RB, sq - i0);
      int64_t n[RB];
      int64_t nmax = 0;
      for (int64_t r = 0; r < nr; ++r) {
        n[r] = causal ? std::clamp<int64_t>(i0 + r + sk - sq + 1, 0, sk) : sk;
        nmax = std::max(nmax, n[r]);
      }
      for (int64_t blk = 0; blk * KB < nmax; ++blk) {
        const float* kb = kt.data() + (bi * nblk + blk) * d * KB;
        for (int64_t r = 0; r < nr; ++r) {
          if (blk * KB >= n[r]) continue;
          const int64_t row = bi * sq + i0 + r;
          float* dst = scores.data() + r * nblk * KB + blk * KB;
#ifdef DSATTN_LIT_AVX512
          if (wide) {
            block_scores_avx512(qp + row * hi * d, wp + row * hi, kb, hi, d, dst);
            continue;
          }
#endif
          block_scores_portable(qp + row * hi * d, wp + row * hi, kb, hi, d, dst);
        }
      }
      for (int64_t r = 0; r < nr; ++r)
        topk_cpu::select_row(scores.data() + r * nblk * KB, n[r], top_k, out_ptr + (bi * sq + i0 + r) * top_k, sc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("lightning_indexer_topk", &lightning_indexer_topk_cpu); }

}  // namespace dsattn
