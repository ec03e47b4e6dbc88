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
// 4. Order the k selected by (key descending, index ascending) with a stable radix sort; -1 fills columns past
//    the selected ones.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "topk_select.h"
#include "cpu/topk_select_row.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace dsattn {
namespace {

using topk_cpu::Scratch;
using topk_cpu::select_row;

at::Tensor topk_select_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& lengths, int64_t k) {
  const at::Tensor len = check_topk_select_inputs(scores, lengths, k);
  const int64_t rows = scores.size(0), cols = scores.size(1);
  const int32_t* len_ptr = len.defined() ? len.data_ptr<int32_t>() : nullptr;
  at::Tensor out = at::empty({rows, k}, scores.options().dtype(at::kInt));
  const float* base = scores.data_ptr<float>();
  const int64_t row_stride = scores.stride(0);
  int32_t* out_ptr = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = len_ptr ? std::clamp<int64_t>(len_ptr[r], 0, cols) : cols;
      select_row(base + r * row_stride, n, k, out_ptr + r * k, sc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("topk_select", &topk_select_cpu); }

}  // namespace dsattn
