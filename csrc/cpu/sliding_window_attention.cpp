// torch.ops.dsattn_C.sliding_window_attention on CPU tensors: the "cpp" backend of dsattn's
// sliding_window_attention and sliding_window_attention_varlen (forward only). Checks the arguments, describes
// the sequences (one per batch entry, or per packed sequence with cu_seqlens) and runs the flash-style kernel
// of attention_impl.h for the ISA resolve_isa() picks; torch.ops.dsattn_C.paged_sliding_window_attention runs the
// same kernel over a paged KV cache read through its block table. Also home of resolve_isa (shared with
// sparse_attention).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/attention_args.h"
#include "cpu/isa_dispatch.h"

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

namespace {

at::Tensor checked_sinks(const c10::optional<at::Tensor>& sinks, int64_t hq, const char* op) {
  if (!sinks.has_value()) return at::Tensor();
  const at::Tensor& t = *sinks;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == hq && t.is_contiguous() &&
                  t.device().is_cpu(),
              "dsattn_C::", op, ": sinks must be a contiguous float32 [Hq] CPU tensor");
  return t;
}

// The kernel's arguments; hd / rd: the head and row (token) dims of q, k, v and out.
SlidingArgs sliding_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         const at::Tensor& sinks_f, const std::vector<Seq>& seqs, int64_t window, bool causal,
                         double scale, int64_t hd, int64_t rd, const char* op) {
  SlidingArgs a;
  set_qkvo(a, q, k, v, out, hd, rd, op);
  a.sinks = sinks_f.defined() ? sinks_f.data_ptr<float>() : nullptr;
  a.seqs = seqs.data();
  a.nseq = static_cast<int64_t>(seqs.size());
  a.hq = q.size(hd);
  a.hkv = k.size(hd);
  a.dqk = q.size(-1);
  a.dv = v.size(-1);
  a.window = window;
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  return a;
}

void run_sliding(const SlidingArgs& a, int64_t isa) {
  dispatch_isa(isa, [&](auto tag) { sliding_window(tag, a); });
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
  const at::Tensor sinks_f = checked_sinks(sinks, hq, op);
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
  SlidingArgs a = sliding_args(q, k, v, out, sinks_f, seqs, window, causal, scale, hd, rd, op);
  run_sliding(a, isa);
  return out;
}

// The paged cache's entry: q [T, Hq, D] packed with cu_seqlens_q, k_cache / v_cache [num_blocks, block_size,
// Hkv, D], block_table int32 [num_seqs, max_blocks], seqlens_k int32 [num_seqs] (sequence s's queries are the
// last of its seqlens_k[s] keys). Causal. Every block id a sequence's keys use is checked against the cache.
at::Tensor paged_sliding_window_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, const at::Tensor& block_table,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& seqlens_k,
                                              const c10::optional<at::Tensor>& sinks, int64_t window, double scale,
                                              int64_t isa) {
  const char* op = "paged_sliding_window_attention";
  check_qkv_common(q, k_cache, v_cache, op);
  TORCH_CHECK(window >= 1, "dsattn_C::", op, ": window must be >= 1, got ", window);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "dsattn_C::", op,
              ": q must be [T, Hq, D], k_cache / v_cache [num_blocks, block_size, Hkv, D]");
  const int64_t hq = q.size(1), hkv = k_cache.size(2), dqk = q.size(2), dv = v_cache.size(3);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && k_cache.size(3) == dqk && v_cache.size(0) == num_blocks &&
                  v_cache.size(1) == block_size && v_cache.size(2) == hkv && block_size > 0,
              "dsattn_C::", op, ": q, k_cache, v_cache shapes disagree");
  for (const at::Tensor* t : {&block_table, &cu_seqlens_q, &seqlens_k})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->device().is_cpu(), "dsattn_C::", op,
                ": block_table, cu_seqlens_q, seqlens_k must be int32 CPU tensors");
  const int64_t n = seqlens_k.numel();
  TORCH_CHECK(seqlens_k.dim() == 1 && cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) == n + 1 &&
                  block_table.dim() == 2 && block_table.size(0) == n,
              "dsattn_C::", op, ": cu_seqlens_q [n + 1], seqlens_k [n], block_table [n, max_blocks] expected");
  const at::Tensor sinks_f = checked_sinks(sinks, hq, op);
  const at::Tensor cqc = cu_seqlens_q.contiguous(), skc = seqlens_k.contiguous(), btc = block_table.contiguous();
  const int32_t* cqp = cqc.data_ptr<int32_t>();
  const int32_t* skp = skc.data_ptr<int32_t>();
  const int32_t* btp = btc.data_ptr<int32_t>();
  const int64_t max_blocks = btc.size(1);
  TORCH_CHECK(cqp[0] == 0 && cqp[n] == q.size(0), "dsattn_C::", op, ": cu_seqlens_q must run from 0 to T");
  at::Tensor out = at::empty({q.size(0), hq, dv}, q.options());
  std::vector<Seq> seqs;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t nq = cqp[s + 1] - cqp[s], nk = skp[s];
    TORCH_CHECK(nq >= 0 && nk >= nq && nk <= max_blocks * block_size, "dsattn_C::", op, ": sequence ", s,
                " has ", nq, " queries and ", nk, " keys (queries must not decrease and be the last of the keys, keys "
                "within the block table)");
    for (int64_t b = 0; b < (nk + block_size - 1) / block_size; ++b) {
      const int32_t id = btp[s * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "dsattn_C::", op, ": block_table[", s, ", ", b, "] = ", id,
                  " is outside the cache's ", num_blocks, " blocks");
    }
    seqs.push_back(Seq{cqp[s] * q.stride(0), 0, 0, cqp[s] * out.stride(0), nq, nk});
  }
  if (out.numel() == 0) return out;
  // The caches [num_blocks, block_size, H, D]: head, row (in a block) and dim strides; blocks stride(0) apart.
  SlidingArgs a = sliding_args(q, q, q, out, sinks_f, seqs, window, true, scale, 1, 0, op);
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  a.hkv = hkv;
  a.dv = dv;
  a.ks = Strides{k_cache.stride(2), k_cache.stride(1), k_cache.stride(3)};
  a.vs = Strides{v_cache.stride(2), v_cache.stride(1), v_cache.stride(3)};
  a.block_table = btp;
  a.table_stride = max_blocks;
  a.block_size = block_size;
  a.kblk = k_cache.stride(0);
  a.vblk = v_cache.stride(0);
  run_sliding(a, isa);
  return out;
}

// Which ISA the kernels run for `isa` (-1: auto/env): 0 portable, 1 avx2, 2 avx512 (tests and `dsattn info`).
int64_t attention_isa_cpu(int64_t isa) { return resolve_isa(isa); }

}  // namespace
}  // namespace cpu_attn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) {
  m.impl("sliding_window_attention", &cpu_attn::sliding_window_attention_cpu);
  m.impl("paged_sliding_window_attention", &cpu_attn::paged_sliding_window_attention_cpu);
}
TORCH_LIBRARY_IMPL(dsattn_C, CompositeExplicitAutograd, m) { m.impl("attention_isa", &cpu_attn::attention_isa_cpu); }

}  // namespace dsattn
