// Shared declarations of the CPU attention kernels (sliding_window_attention.cpp, sparse_attention.cpp).
//
// The arithmetic lives in attention_impl.h, compiled three times: cpu_isa_avx512.cpp and cpu_isa_avx2.cpp (each
// under its own `#pragma GCC target`, in its own namespace so that no inline function built for one ISA is merged
// into another's callers) and cpu_isa_portable.cpp (the baseline ISA of the build, any architecture).
// resolve_isa() picks one at run time from the CPU's features; dispatch_isa (isa_dispatch.h) calls it.
// Arguments are raw pointers and element strides (int64): the ISA files include no ATen tensor headers.
#pragma once

#include <cstdint>

namespace dsattn {
namespace cpu_attn {

enum Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
// Also the private `isa` argument of the dsattn_C attention ops: -1 = best the CPU has (or env DSATTN_CPU_ISA).
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// One sequence: element offsets of its (head 0, row 0, dim 0) in q / k / v / out, and its lengths. The padded
// op has one per batch entry; varlen one per packed sequence.
struct Seq {
  int64_t q_off, k_off, v_off, o_off, sq, sk;
};

// Element strides (head, row, dim) shared by every sequence.
struct Strides {
  int64_t h, r, d;
};

struct SlidingArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  Dtype dtype;
  const float* sinks;  // [Hq] or nullptr
  const Seq* seqs;
  int64_t nseq, hq, hkv, dqk, dv, window;
  bool causal;
  float scale;
  Strides qs, ks, vs, os;
  // Paged K/V (block_table non-null): key j of sequence s is row j % block_size of block
  // block_table[s * table_stride + j / block_size], blocks kblk / vblk elements apart (Seq's k_off / v_off unused).
  const int32_t* block_table = nullptr;
  int64_t table_stride = 0, block_size = 1, kblk = 0, vblk = 0;
};

struct SparseArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  Dtype dtype;
  const void* indices;  // int32 or int64
  bool idx64;
  int64_t idx_sb, idx_sh, idx_sr, idx_st;  // strides of [B, (Hkv), Sq, topk]; idx_sh = 0 when shared by heads
  int64_t batch, hq, hkv, sq, sk, dqk, dv, topk;
  bool causal;
  float scale;
  int64_t qb, kb, vb, ob;  // batch strides
  Strides qs, ks, vs, os;
};

// Hybrid attention (hybrid_attention_impl.h): q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv, Sk, Dv]; exact
// softmax over the first `prefix` and the last `window` keys of each query, phi(q).phi(k) weights over the rest.
enum HybridFeatureMap : int { kHybridElu = 0, kHybridRelu = 1, kHybridIdentity = 2 };
struct HybridArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  Dtype dtype;
  int64_t batch, hq, hkv, sq, sk, dqk, dv, prefix, window;
  int fmap;  // HybridFeatureMap
  float scale;
  int64_t qb, kb, vb, ob;  // batch strides
  Strides qs, ks, vs, os;
};

// int8_matmul (int8_matmul_impl.h): out[M, N] (row stride n) = x[M, K] (row stride ldx) @ dequant(q[N, K]).T
// (+ bias); s [N] per output channel (group 0) or [N, K/group]. All fp32 but q.
struct Int8Args {
  const float* x;
  int64_t ldx;
  const int8_t* q;
  const float* s;
  const float* bias;  // [N] or nullptr
  float* out;
  int64_t m, n, k, group;
};

// The ISA to run for `requested` (-1: the best this CPU has, unless env DSATTN_CPU_ISA = portable / avx2 /
// avx512 asks for another); an ISA this CPU or build lacks is an error.
Isa resolve_isa(int64_t requested);
bool isa_available(Isa isa);

// One namespace per ISA. Its Tag (dispatch_isa passes it) selects the ISA's entry points, overloads of one name
// found by argument-dependent lookup: sliding_window(tag, a), sparse(tag, a), hybrid(tag, a), int8_matmul(tag, a).
#define DSATTN_DECLARE_ISA(ns, isa)                 \
  namespace ns {                                    \
  struct Tag {                                      \
    static constexpr Isa value = isa;               \
  };                                                \
  void sliding_window(Tag, const SlidingArgs& a);   \
  void sparse(Tag, const SparseArgs& a);            \
  void hybrid(Tag, const HybridArgs& a);            \
  void int8_matmul(Tag, const Int8Args& a);         \
  bool compiled();                                  \
  }
DSATTN_DECLARE_ISA(isa_portable, kPortable)
DSATTN_DECLARE_ISA(isa_avx2, kAvx2)
DSATTN_DECLARE_ISA(isa_avx512, kAvx512)
#undef DSATTN_DECLARE_ISA

}  // namespace cpu_attn
}  // namespace dsattn
