// The tensor side of the CPU attention entries (sliding_window_attention.cpp, sparse_attention.cpp,
// linear_attention.cpp, hybrid_attention.cpp): the checks and the tensor-to-kernel-argument packing they share.
// Apart from attention_kernels.h because the ISA files that include that one must not include ATen's tensor headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "cpu/attention_kernels.h"

namespace dsattn {
namespace cpu_attn {

// `op` names the dsattn_C op in messages ("dsattn_C::<op>: ...").
inline void check_qkv_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (const at::Tensor* t : {&q, &k, &v}) TORCH_CHECK(t->device().is_cpu(), "dsattn_C::", op, ": CPU tensors only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "dsattn_C::", op,
              ": q, k, v must share a dtype");
}

inline Dtype dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "dsattn_C::", op, ": q, k, v must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kFloat32;
}

// The [B, H, S, D] ops' checks (linear_attention, hybrid_attention): q [B, Hq, Sq, Dqk],
// k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv] on the CPU, of one float dtype (else TypeError), Hq a multiple of Hkv
// (else ValueError). `prefix` starts every message ("dsattn_C::<op>: ").
struct BhsdSizes {
  int64_t b, hq, sq, dqk, hkv, sk, dv;
};
inline BhsdSizes checked_bhsd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* prefix) {
  for (const at::Tensor* t : {&q, &k, &v}) TORCH_CHECK(t->device().is_cpu(), prefix, "CPU tensors only");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), prefix,
                   "q, k, v must share a dtype");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                   prefix, "q, k, v must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, prefix, "q, k, v must be 4-D [B, H, S, D]");
  const BhsdSizes s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), v.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == s.b && v.size(0) == s.b && v.size(1) == s.hkv && v.size(2) == s.sk &&
                        k.size(3) == s.dqk,
                    prefix, "q, k, v shapes disagree");
  TORCH_CHECK_VALUE(s.hkv > 0 && s.hq % s.hkv == 0, prefix, "Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(s.dqk >= 1 && s.dv >= 1, prefix, "head dims must be >= 1");
  return s;
}

// Data pointers, dtype and (head, row, dim) element strides of q, k, v and out, whose head and row dims are hd
// and rd (the dim is the last): the fields every *Args of attention_kernels.h has under these names.
template <typename Args>
void set_qkvo(Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              int64_t hd, int64_t rd, const char* op) {
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.dtype = dtype_of(q, op);
  a.qs = Strides{q.stride(hd), q.stride(rd), q.stride(-1)};
  a.ks = Strides{k.stride(hd), k.stride(rd), k.stride(-1)};
  a.vs = Strides{v.stride(hd), v.stride(rd), v.stride(-1)};
  a.os = Strides{out.stride(hd), out.stride(rd), out.stride(-1)};
}

// The same for [B, H, S, D] tensors, with the batch strides (qb, kb, vb, ob).
template <typename Args>
void set_qkvo_bhsd(Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const char* op) {
  set_qkvo(a, q, k, v, out, 1, 2, op);
  a.qb = q.stride(0);
  a.kb = k.stride(0);
  a.vb = v.stride(0);
  a.ob = out.stride(0);
}

}  // namespace cpu_attn
}  // namespace dsattn
