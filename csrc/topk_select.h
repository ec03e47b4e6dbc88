// Input contract of torch.ops.dsattn.topk_select, shared by its CPU (csrc/cpu/topk_select.cpp) and CUDA
// (csrc/cuda/topk_select.cu) implementations so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

namespace dsattn {

// scores float32 [R, T] (last dim contiguous), lengths int32 [R] on scores' device or none, k >= 1.
// Returns lengths made contiguous (an undefined tensor when none was given).
inline at::Tensor check_topk_select_inputs(const at::Tensor& scores, const c10::optional<at::Tensor>& lengths,
                                           int64_t k) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "topk_select: scores must be 2-D [R, T], got ", scores.dim(), "-D");
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, "topk_select: scores must be float32, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.size(1) <= 1 || scores.stride(1) == 1,
                    "topk_select: scores must have a contiguous last dim (stride 1), got stride ", scores.stride(1));
  TORCH_CHECK_VALUE(k >= 1, "topk_select: k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(scores.size(1) <= INT32_MAX && k <= INT32_MAX, "topk_select: T and k must be < 2^31");
  if (!lengths.has_value()) return at::Tensor();
  at::Tensor len = lengths->contiguous();
  TORCH_CHECK_TYPE(len.scalar_type() == at::kInt, "topk_select: lengths must be int32, got ", len.scalar_type());
  TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == scores.size(0), "topk_select: lengths must be [R=",
                    scores.size(0), "], got ", len.sizes());
  TORCH_CHECK_VALUE(len.device() == scores.device(), "topk_select: lengths must be on scores' device");
  return len;
}

}  // namespace dsattn
