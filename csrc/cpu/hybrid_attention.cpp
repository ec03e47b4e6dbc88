// torch.ops.dsattn_C.hybrid_attention on CPU tensors: the "cpp" backend of dsattn.hybrid_attention (forward only;
// the "elu", "relu" and "identity" feature maps). Checks the arguments and runs hybrid_attention_impl.h, compiled
// with the attention kernels once per ISA (attention_isa_*.cpp) and picked at run time by resolve_isa.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/attention_kernels.h"

namespace dsattn {
namespace cpu_attn {
namespace {

at::Tensor hybrid_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t prefix,
                                int64_t window, int64_t feature_map, double scale, int64_t isa) {
  const char* op = "dsattn_C::hybrid_attention: ";
  for (const at::Tensor* t : {&q, &k, &v}) TORCH_CHECK(t->device().is_cpu(), op, "CPU tensors only");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   "q, k, v must share a dtype");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                   op, "q, k, v must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, "q, k, v must be 4-D [B, H, S, D]");
  const int64_t b = q.size(0), hq = q.size(1), sq = q.size(2), dqk = q.size(3);
  const int64_t hkv = k.size(1), sk = k.size(2), dv = v.size(3);
  TORCH_CHECK_VALUE(k.size(0) == b && v.size(0) == b && v.size(1) == hkv && v.size(2) == sk && k.size(3) == dqk, op,
                    "q, k, v shapes disagree");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, op, "Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(dqk >= 1 && dv >= 1, op, "head dims must be >= 1");
  TORCH_CHECK_VALUE(prefix >= 0 && window >= 0, op, "prefix and window must be >= 0");
  TORCH_CHECK_VALUE(feature_map >= kHybridElu && feature_map <= kHybridIdentity, op,
                    "feature_map must be 0 (elu), 1 (relu) or 2 (identity), got ", feature_map);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, "scale must be a positive finite number");
  if (b * hq * sq == 0 || sk == 0) return at::zeros({b, hq, sq, dv}, q.options());
  at::Tensor out = at::empty({b, hq, sq, dv}, q.options());
  HybridArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.dtype = q.scalar_type() == at::kBFloat16 ? kBFloat16 : q.scalar_type() == at::kHalf ? kFloat16 : kFloat32;
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
  a.qb = q.stride(0);
  a.kb = k.stride(0);
  a.vb = v.stride(0);
  a.ob = out.stride(0);
  a.qs = Strides{q.stride(1), q.stride(2), q.stride(3)};
  a.ks = Strides{k.stride(1), k.stride(2), k.stride(3)};
  a.vs = Strides{v.stride(1), v.stride(2), v.stride(3)};
  a.os = Strides{out.stride(1), out.stride(2), out.stride(3)};
  switch (resolve_isa(isa)) {
    case kAvx512: isa_avx512::hybrid(a); break;
    case kAvx2: isa_avx2::hybrid(a); break;
    default: isa_portable::hybrid(a); break;
  }
  return out;
}

}  // namespace
}  // namespace cpu_attn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("hybrid_attention", &cpu_attn::hybrid_attention_cpu); }

}  // namespace dsattn
