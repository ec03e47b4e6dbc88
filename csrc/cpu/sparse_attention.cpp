// torch.ops.dsattn_C.sparse_attention on CPU tensors: the "cpp" backend of dsattn's sparse_attention (forward
// only). Per (batch, KV head, query) the listed keys in [0, Sk) (causal: at or before the query's position
// i + Sk - Sq; anything else, -1 included, is "no key") are gathered once for the KV group's query heads and
// attended with an online softmax (attention_impl.h). Duplicated entries count once per listing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu/attention_args.h"
#include "cpu/isa_dispatch.h"

namespace dsattn {
namespace cpu_attn {

namespace {

at::Tensor sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& indices, bool causal, double scale, int64_t isa) {
  const char* op = "sparse_attention";
  check_qkv_common(q, k, v, op);
  TORCH_CHECK(indices.device().is_cpu(), "dsattn_C::", op, ": CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "dsattn_C::", op, ": q, k, v must be 4-D [B, H, S, D]");
  const int64_t b = q.size(0), hq = q.size(1), sq = q.size(2), dqk = q.size(3);
  const int64_t hkv = k.size(1), sk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == b && v.size(0) == b && v.size(1) == hkv && v.size(2) == sk && k.size(3) == dqk,
              "dsattn_C::", op, ": q, k, v shapes disagree");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "dsattn_C::", op, ": q heads must be a multiple of k/v heads");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, "dsattn_C::", op,
              ": indices must be int32 or int64");
  const bool shared = indices.dim() == 3;
  TORCH_CHECK(shared || indices.dim() == 4, "dsattn_C::", op, ": indices must be [B, Sq, topk] or [B, Hkv, Sq, topk]");
  TORCH_CHECK(indices.size(0) == b && indices.size(shared ? 1 : 2) == sq && (shared || indices.size(1) == hkv),
              "dsattn_C::", op, ": indices shape disagrees with q/k");
  at::Tensor out = at::empty({b, hq, sq, dv}, q.options());
  if (out.numel() == 0) return out;
  SparseArgs a;
  set_qkvo_bhsd(a, q, k, v, out, op);
  a.indices = indices.data_ptr();
  a.idx64 = indices.scalar_type() == at::kLong;
  a.idx_sb = indices.stride(0);
  a.idx_sh = shared ? 0 : indices.stride(1);
  a.idx_sr = indices.stride(shared ? 1 : 2);
  a.idx_st = indices.stride(-1);
  a.batch = b;
  a.hq = hq;
  a.hkv = hkv;
  a.sq = sq;
  a.sk = sk;
  a.dqk = dqk;
  a.dv = dv;
  a.topk = indices.size(-1);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  dispatch_isa(isa, [&](auto tag) { sparse(tag, a); });
  return out;
}

}  // namespace
}  // namespace cpu_attn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("sparse_attention", &cpu_attn::sparse_attention_cpu); }

}  // namespace dsattn
