// CPU twin of csrc/cuda/topk_select.cu (same algorithm, so it is verified where no GPU exists):
// row-wise top-k of float32 scores [R, T] by radix select, for dsattn.lightning_indexer_topk with top_k > 2048.
//
// Per row (n = min(lengths[r], T) valid leading columns):
// 1. Each score becomes an order-preserving uint32 key (negative: ~bits, else bits | 0x80000000; NaN -> 0, so
//    NaN ranks below -inf and never above a number).
// 2. n <= k: every valid column is selected. Else 4 histogram passes of 8 bits, high digit first, over the keys
//    that match the digits fixed so far; each pass fixes the digit of the k-th largest key. After them `thr` is
//    the k-th largest key and `take_eq` the number of columns with key == thr that belong to the top k.
// 3. Collect in index order: every key > thr, and the first take_eq keys == thr (ties go to the lower index).
// 4. Order the k selected by (key descending, index ascending); -1 fills columns past the selected ones.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "topk_select.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace dsattn {
namespace {

inline uint32_t score_key(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  if (s != s) return 0u;  // NaN
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

void select_row(const float* row, int64_t n, int64_t k, int32_t* out, std::vector<uint32_t>& keys,
                std::vector<std::pair<uint32_t, int32_t>>& picked) {
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = score_key(row[j]);
  uint32_t thr = 0;
  int64_t take_eq = n;  // n <= k: thr 0 takes every key (all keys >= 0)
  if (n > k) {
    uint32_t prefix = 0, mask = 0;
    int64_t remaining = k;  // how many of the keys matching `prefix` still belong to the top k
    for (int shift = 24; shift >= 0; shift -= 8) {
      int64_t hist[256] = {0};
      for (int64_t j = 0; j < n; ++j)
        if ((keys[j] & mask) == prefix) ++hist[(keys[j] >> shift) & 0xFFu];
      int digit = 255;
      for (; digit > 0 && hist[digit] < remaining; --digit) remaining -= hist[digit];
      prefix |= static_cast<uint32_t>(digit) << shift;
      mask |= 0xFFu << shift;
    }
    thr = prefix;
    take_eq = remaining;
  }
  picked.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (keys[j] > thr) {
      picked.emplace_back(keys[j], static_cast<int32_t>(j));
    } else if (keys[j] == thr && take_eq > 0) {
      picked.emplace_back(keys[j], static_cast<int32_t>(j));
      --take_eq;
    }
  }
  // Collected in index order, so a stable sort by key descending gives (key desc, index asc).
  std::stable_sort(picked.begin(), picked.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  const int64_t m = static_cast<int64_t>(picked.size());
  for (int64_t i = 0; i < m; ++i) out[i] = picked[i].second;
  for (int64_t i = m; i < k; ++i) out[i] = -1;
}

at::Tensor topk_select_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& lengths, int64_t k) {
  const at::Tensor len = check_topk_select_inputs(scores, lengths, k);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  const int32_t* len_ptr = len.defined() ? len.data_ptr<int32_t>() : nullptr;
  at::Tensor out = at::empty({rows, k}, scores.options().dtype(at::kInt));
  const float* base = scores.data_ptr<float>();
  const int64_t row_stride = scores.stride(0);
  int32_t* out_ptr = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys;
    std::vector<std::pair<uint32_t, int32_t>> picked;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = len_ptr ? std::clamp<int64_t>(len_ptr[r], 0, cols) : cols;
      select_row(base + r * row_stride, n, k, out_ptr + r * k, keys, picked);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("topk_select", &topk_select_cpu); }

}  // namespace dsattn
