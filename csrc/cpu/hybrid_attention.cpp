// torch.ops.dsattn_C.hybrid_attention on CPU tensors: the "cpp" backend of dsattn.hybrid_attention (forward only;
// the "elu", "relu" and "identity" feature maps). Checks the arguments and runs hybrid_attention_impl.h, compiled
// with the attention kernels once per ISA (cpu_isa_*.cpp) and picked at run time by dispatch_isa.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/attention_args.h"
#include "cpu/attention_kernels.h"
#include "cpu/isa_dispatch.h"

namespace dsattn {
namespace cpu_attn {
namespace {

at::Tensor hybrid_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t prefix,
                                int64_t window, int64_t feature_map, double scale, int64_t isa) {
  const char* op = "dsattn_C::hybrid_attention: ";
  const auto [b, hq, sq, dqk, hkv, sk, dv] = checked_bhsd(q, k, v, op);
  TORCH_CHECK_VALUE(prefix >= 0 && window >= 0, op, "prefix and window must be >= 0");
  TORCH_CHECK_VALUE(feature_map >= kHybridElu && feature_map <= kHybridIdentity, op,
                    "feature_map must be 0 (elu), 1 (relu) or 2 (identity), got ", feature_map);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, "scale must be a positive finite number");
  if (b * hq * sq == 0 || sk == 0) return at::zeros({b, hq, sq, dv}, q.options());
  at::Tensor out = at::empty({b, hq, sq, dv}, q.options());
  HybridArgs a;
  set_qkvo_bhsd(a, q, k, v, out, "hybrid_attention");
  a.batch = b;
  a.hq = hq;
  a.hkv = hkv;
  a.sq = sq;
  a.sk = sk;
  a.dqk = dqk;
  a.dv = dv;
  // a prefix or window past every key changes nothing; the clamp keeps p - window from overflowing
  a.prefix = std::min(prefix, sk);
  a.window = std::min(window, sk + sq + 1);
  a.fmap = static_cast<int>(feature_map);
  a.scale = static_cast<float>(scale);
  dispatch_isa(isa, [&](auto tag) { hybrid(tag, a); });
  return out;
}

}  // namespace
}  // namespace cpu_attn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("hybrid_attention", &cpu_attn::hybrid_attention_cpu); }

}  // namespace dsattn
