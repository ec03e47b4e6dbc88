// CUDA row-wise top-k of float32 scores [R, T] by radix select, for dsattn.lightning_indexer_topk at
// top_k > 2048 (beyond the fused Triton kernel's register-resident running top-k). Same algorithm as the CPU
// twin csrc/cpu/topk_select.cpp (read its header for the steps); DeepSeek's inference selects the indexer's
// top-k the same way (radix histogram passes over the order-preserving integer of the score).
//
// One block of kThreads threads per row; every pass streams the row from global memory (L2 keeps it between
// passes), 4 consecutive columns per thread per step (one float4 load when the rows are 16-byte aligned):
// - 4 histogram passes of 8 bits over uint32 keys (negative: ~bits, else bits | 0x80000000; NaN -> 0, below
//   -inf), 256 shared-memory bins with shared atomics; warp 0 scans the bins (high digit first) with a warp
//   prefix sum and a ballot to fix the k-th largest key's next digit.
// - collect in index order: keys > thr, and the lowest-index `take_eq` keys == thr, with two block-wide
//   exclusive scans per tile (tie rank, then output slot). Writes selected indices and their keys (as int32,
//   key ^ 0x80000000: same order) in index order, -1 / INT32_MIN past the selected ones.
// - ordering (second step, any k): a stable segmented sort of the keys, descending (at::sort), and a gather:
//   index order among equal keys is kept, so rows come out (score desc, index asc). A block-wide sort in
//   shared memory would fit only k <= ~16K on sm_80, and users run top_k up to 16384 and beyond.
// Shared memory: 256 + 33 ints. No per-thread arrays beyond 4 floats.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "topk_select.h"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace dsattn {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // consecutive columns per thread per step (one float4)

__device__ __forceinline__ uint32_t score_key(float s) {
  const uint32_t bits = __float_as_uint(s);
  if (s != s) return 0u;  // NaN ranks below -inf
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Keys of columns i .. i+3 (valid: i + e < n; others get key 0 and must be ignored by the caller).
template <bool VEC>
__device__ __forceinline__ void load_keys(const float* __restrict__ row, int64_t i, int64_t n,
                                          uint32_t (&key)[kItems]) {
  if (VEC && i + kItems <= n) {
    const float4 f = *reinterpret_cast<const float4*>(row + i);
    key[0] = score_key(f.x);
    key[1] = score_key(f.y);
    key[2] = score_key(f.z);
    key[3] = score_key(f.w);
  } else {
#pragma unroll
    for (int e = 0; e < kItems; ++e) key[e] = i + e < n ? score_key(row[i + e]) : 0u;
  }
}

// Block-wide exclusive prefix sum of v; *total gets the block's sum. scratch: kWarps + 1 ints of shared memory.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += t;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += t;
    }
    if (lane < kWarps) scratch[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const int before = (warp > 0 ? scratch[warp - 1] : 0) + incl - v;
  *total = scratch[kWarps - 1];
  __syncthreads();  // scratch is reused by the next call
  return before;
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) topk_select_kernel(const float* __restrict__ scores, int64_t row_stride,
                                                               int64_t cols, const int32_t* __restrict__ lengths,
                                                               int64_t k, int32_t* __restrict__ sel_idx,
                                                               int32_t* __restrict__ sel_key) {
  __shared__ int hist[256];
  __shared__ int scratch[kWarps + 1];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;

  const int64_t r = blockIdx.x;
  const float* row = scores + r * row_stride;
  int64_t n = cols;
  if (lengths != nullptr) n = min(max(static_cast<int64_t>(lengths[r]), int64_t{0}), cols);
  int32_t* out_idx = sel_idx + r * k;
  int32_t* out_key = sel_key + r * k;
  const int tid = threadIdx.x;
  const int64_t step = static_cast<int64_t>(kThreads) * kItems;

  uint32_t thr = 0;
  int take_eq = static_cast<int>(min(n, k));  // n <= k: thr 0 takes every column
  if (n > k) {
    uint32_t prefix = 0, mask = 0;
    int remaining = static_cast<int>(k);
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t i = static_cast<int64_t>(tid) * kItems; i < n; i += step) {
        uint32_t key[kItems];
        load_keys<VEC>(row, i, n, key);
#pragma unroll
        for (int e = 0; e < kItems; ++e)
          if (i + e < n && (key[e] & mask) == prefix) atomicAdd(&hist[(key[e] >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l owns bins 255 - 8l down to 248 - 8l: a prefix sum over lanes counts keys from the top digit.
        int own = 0;
#pragma unroll
        for (int b = 0; b < 8; ++b) own += hist[255 - 8 * tid - b];
        int incl = own;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const int t = __shfl_up_sync(0xffffffffu, incl, d);
          if (tid >= d) incl += t;
        }
        const unsigned hit = __ballot_sync(0xffffffffu, incl >= remaining);
        const int lane = hit ? __ffs(hit) - 1 : 31;  // always hit: the matching keys number >= remaining
        if (tid == lane) {
          int left = remaining - (incl - own);
          int digit = 255 - 8 * lane;
          for (int b = 0; b < 7 && hist[digit] < left; ++b, --digit) left -= hist[digit];
          s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
          s_remaining = left;
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 0xFFu << shift;
      __syncthreads();  // s_prefix / hist are rewritten by the next pass
    }
    thr = prefix;
    take_eq = remaining;
  }

  // Collect in index order: keys > thr, then ties == thr while fewer than take_eq were taken.
  const int target = static_cast<int>(min(n, k));
  int eq_base = 0, sel_base = 0;
  for (int64_t i0 = 0; i0 < n && sel_base < target; i0 += step) {
    const int64_t i = i0 + static_cast<int64_t>(tid) * kItems;
    uint32_t key[kItems];
    load_keys<VEC>(row, i, n, key);
    int eq_count = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) eq_count += (i + e < n && key[e] == thr);
    int eq_total;
    int eq_rank = eq_base + block_exclusive_scan(eq_count, scratch, &eq_total);
    bool take[kItems];
    int sel_count = 0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const bool valid = i + e < n;
      bool t = valid && key[e] > thr;
      if (valid && key[e] == thr) t = eq_rank++ < take_eq;
      take[e] = t;
      sel_count += t;
    }
    int sel_total;
    int slot = sel_base + block_exclusive_scan(sel_count, scratch, &sel_total);
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      if (take[e]) {
        out_idx[slot] = static_cast<int32_t>(i + e);
        out_key[slot] = static_cast<int32_t>(key[e] ^ 0x80000000u);
        ++slot;
      }
    }
    eq_base += eq_total;
    sel_base += sel_total;
  }
  for (int64_t p = target + tid; p < k; p += kThreads) {
    out_idx[p] = -1;
    out_key[p] = INT32_MIN;
  }
}

at::Tensor topk_select_cuda(const at::Tensor& scores, const c10::optional<at::Tensor>& lengths, int64_t k) {
  const at::Tensor len = check_topk_select_inputs(scores, lengths, k);
  TORCH_CHECK_VALUE(scores.size(0) <= INT32_MAX, "topk_select: at most 2^31-1 rows");  // one block per row
  const int64_t rows = scores.size(0), cols = scores.size(1);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor sel_idx = at::empty({rows, k}, scores.options().dtype(at::kInt));
  if (rows == 0) return sel_idx;
  at::Tensor sel_key = at::empty({rows, k}, scores.options().dtype(at::kInt));
  const bool vec = reinterpret_cast<uintptr_t>(scores.data_ptr<float>()) % 16 == 0 &&
                   (rows == 1 || scores.stride(0) % 4 == 0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int32_t* len_ptr = len.defined() ? len.data_ptr<int32_t>() : nullptr;
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores.data_ptr<float>(), scores.stride(0), cols,
                                                                 len_ptr, k, sel_idx.data_ptr<int32_t>(),
                                                                 sel_key.data_ptr<int32_t>());
  };
  if (vec) {
    launch(topk_select_kernel<true>);
  } else {
    launch(topk_select_kernel<false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (k == 1) return sel_idx;
  // Stable descending sort of the keys keeps index order among equal scores: (score desc, index asc).
  const auto order = std::get<1>(at::sort(sel_key, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  return sel_idx.gather(1, order);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsattn_C, CUDA, m) { m.impl("topk_select", &topk_select_cuda); }

}  // namespace dsattn
