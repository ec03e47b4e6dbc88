// torch.ops.dsattn_C.sliding_window_attention on CPU tensors: the "cpp" backend of dsattn's
// sliding_window_attention and sliding_window_attention_varlen (forward only). Checks the arguments, describes
// the sequences (one per batch entry, or per packed sequence with cu_seqlens) and runs the flash-style kernel
// of attention_impl.h for the ISA resolve_isa() picks. Also home of resolve_isa (shared with sparse_attention).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/attention_kernels.h"

namespace dsattn {
namespace cpu_attn {

namespace {
bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kPortable;
}

const char* isa_name(Isa isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "portable"; }
}  // namespace

bool isa_available(Isa isa) {
  if (isa == kAvx512) return isa_avx512::compiled() && cpu_has(kAvx512);
  if (isa == kAvx2) return isa_avx2::compiled() && cpu_has(kAvx2);
  return true;
}

Isa resolve_isa(int64_t requested) {
  if (requested < 0) {
    const char* env = std::getenv("DSATTN_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      const std::string name(env);
      TORCH_CHECK(name == "portable" || name == "avx2" || name == "avx512",
                  "dsattn: env DSATTN_CPU_ISA must be portable, avx2 or avx512, got ", name);
      requested = name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : kPortable;
    }
  }
  if (requested < 0) return isa_available(kAvx512) ? kAvx512 : isa_available(kAvx2) ? kAvx2 : kPortable;
  TORCH_CHECK(requested <= kAvx512, "dsattn: isa must be -1 (auto), 0 (portable), 1 (avx2) or 2 (avx512), got ",
              requested);
  const Isa isa = static_cast<Isa>(requested);
  TORCH_CHECK(isa_available(isa), "dsattn: this CPU or build has no ", isa_name(isa), " kernels");
  return isa;
}

Dtype dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: TORCH_CHECK(false, "dsattn_C::", op, ": q, k, v must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kFloat32;
}

namespace {

void check_qkv_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (const at::Tensor* t : {&q, &k, &v}) TORCH_CHECK(t->device().is_cpu(), "dsattn_C::", op, ": CPU tensors only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "dsattn_C::", op,
              ": q, k, v must share a dtype");
}

at::Tensor sliding_window_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const c10::optional<at::Tensor>& sinks,
                                        const c10::optional<at::Tensor>& cu_seqlens_q,
                                        const c10::optional<at::Tensor>& cu_seqlens_k, int64_t window, bool causal,
                                        double scale, int64_t isa) {
  const char* op = "sliding_window_attention";
  check_qkv_common(q, k, v, op);
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "dsattn_C::", op, ": cu_seqlens_q and cu_seqlens_k go together");
  TORCH_CHECK(window >= 1, "dsattn_C::", op, ": window must be >= 1, got ", window);
  const int64_t hd = varlen ? 1 : 1;  // head dim index in both layouts: [B, H, S, D] / [T, H, D]
  const int64_t rd = varlen ? 0 : 2;  // row (token) dim
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4) && k.dim() == q.dim() && v.dim() == q.dim(), "dsattn_C::", op,
              ": q, k, v must be ", varlen ? "3-D [T, H, D] (varlen)" : "4-D [B, H, S, D]");
  const int64_t hq = q.size(hd), hkv = k.size(hd), dqk = q.size(-1), dv = v.size(-1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && v.size(hd) == hkv, "dsattn_C::", op, ": bad head counts");
  TORCH_CHECK(k.size(-1) == dqk && v.size(rd) == k.size(rd), "dsattn_C::", op, ": k/v shapes disagree");
  at::Tensor sinks_f;
  if (sinks.has_value()) {
    sinks_f = *sinks;
    TORCH_CHECK(sinks_f.scalar_type() == at::kFloat && sinks_f.dim() == 1 && sinks_f.size(0) == hq &&
                    sinks_f.is_contiguous() && sinks_f.device().is_cpu(),
                "dsattn_C::", op, ": sinks must be a contiguous float32 [Hq] CPU tensor");
  }
  at::Tensor out;
  std::vector<Seq> seqs;
  if (varlen) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    TORCH_CHECK(cq.scalar_type() == at::kInt && ck.scalar_type() == at::kInt && cq.dim() == 1 &&
                    cq.sizes() == ck.sizes() && cq.size(0) >= 1 && cq.device().is_cpu() && ck.device().is_cpu(),
                "dsattn_C::", op, ": cu_seqlens must be int32 [num_seqs + 1] CPU tensors of one length");
    const at::Tensor cqc = cq.contiguous(), ckc = ck.contiguous();
    const int32_t* cqp = cqc.data_ptr<int32_t>();
    const int32_t* ckp = ckc.data_ptr<int32_t>();
    const int64_t n = cq.size(0) - 1;
    TORCH_CHECK(cqp[0] == 0 && ckp[0] == 0 && cqp[n] == q.size(0) && ckp[n] == k.size(0), "dsattn_C::", op,
                ": cu_seqlens must run from 0 to the token counts");
    out = at::empty({q.size(0), hq, dv}, q.options());
    for (int64_t s = 0; s < n; ++s) {
      TORCH_CHECK(cqp[s + 1] >= cqp[s] && ckp[s + 1] >= ckp[s], "dsattn_C::", op, ": cu_seqlens must not decrease");
      seqs.push_back(Seq{cqp[s] * q.stride(0), ckp[s] * k.stride(0), ckp[s] * v.stride(0), cqp[s] * out.stride(0),
                         cqp[s + 1] - cqp[s], ckp[s + 1] - ckp[s]});
    }
  } else {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "dsattn_C::", op, ": batch sizes differ");
    out = at::empty({q.size(0), hq, q.size(2), dv}, q.options());
    for (int64_t b = 0; b < q.size(0); ++b)
      seqs.push_back(Seq{b * q.stride(0), b * k.stride(0), b * v.stride(0), b * out.stride(0), q.size(2), k.size(2)});
  }
  if (out.numel() == 0) return out;
  SlidingArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.dtype = dtype_of(q, op);
  a.sinks = sinks_f.defined() ? sinks_f.data_ptr<float>() : nullptr;
  a.seqs = seqs.data();
  a.nseq = static_cast<int64_t>(seqs.size());
  a.hq = hq;
  a.hkv = hkv;
  a.dqk = dqk;
  a.dv = dv;
  a.window = window;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.qs = Strides{q.stride(hd), q.stride(rd), q.stride(-1)};
  a.ks = Strides{k.stride(hd), k.stride(rd), k.stride(-1)};
  a.vs = Strides{v.stride(hd), v.stride(rd), v.stride(-1)};
  a.os = Strides{out.stride(hd), out.stride(rd), out.stride(-1)};
  switch (resolve_isa(isa)) {
    case kAvx512: isa_avx512::sliding_window(a); break;
    case kAvx2: isa_avx2::sliding_window(a); break;
    default: isa_portable::sliding_window(a); break;
  }
  return out;
}

// Which ISA the kernels run for `isa` (-1: auto/env): 0 portable, 1 avx2, 2 avx512 (tests and `dsattn info`).
int64_t attention_isa_cpu(int64_t isa) { return resolve_isa(isa); }

}  // namespace
}  // namespace cpu_attn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("sliding_window_attention", &cpu_attn::sliding_window_attention_cpu); }
TORCH_LIBRARY_IMPL(dsattn_C, CompositeExplicitAutograd, m) { m.impl("attention_isa", &cpu_attn::attention_isa_cpu); }

}  // namespace dsattn
