// The one place where dsattn's compiled kernels are declared (schemas). Implementations register per backend:
// csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(dsattn_C, CPU, m), csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(dsattn_C, CUDA, m).
// They live in their own namespace, torch.ops.dsattn_C.*: torch.ops.dsattn.* are the public ops (Python custom
// ops, dsattn/ops/), whose "cpp" / "cuda" backends call these kernels. Fake kernels: dsattn/_ext.py.
// Lean includes on purpose: <torch/extension.h> costs ~50 s per translation unit.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dsattn_C, m) {
  // int4: qweight int32 [N, K/8], element (n, 8*j + i) in bits [4i, 4i+4) of qweight[n, j].
  m.def("int4_unpack(Tensor qweight) -> Tensor");
  // x [M, K] @ dequantized weight^T (+ bias [N]) -> [M, N]; zeros uint8 [N, K/g]. Per implementation:
  //   CPU (csrc/cpu/int4_matmul.cpp):  x float32/bfloat16 -> x's dtype; scales, bias float32.
  //   CUDA (csrc/cuda/int4_matmul.cu): x float16/bfloat16/float32 -> x's dtype; scales and bias each
  //   float16/bfloat16/float32 (converted on load); fp32 accumulation; built for decode (M <= 16).
  m.def("int4_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias=None) -> Tensor");
  // int8 weight-only: x float32/bfloat16 [M, K] @ (qweight int8 [N, K] * scales).T (+ bias) -> [M, N] in x's
  // dtype; scales float32 [N] (group_size None) or [N, K/group_size]; bias float32; isa as the attention ops'
  // (csrc/cpu/int8_matmul.cpp).
  m.def("int8_matmul(Tensor x, Tensor qweight, Tensor scales, int? group_size, Tensor? bias=None, int isa=-1) "
        "-> Tensor");
  // Row-wise top-k by radix select: scores float32 [R, T] (unit column stride), lengths int32 [R] or None (valid
  // leading columns per row) -> int32 [R, k] column indices, highest score first, ties to the lower index, -1
  // where a row has fewer than k valid columns; NaN ranks below -inf (csrc/{cpu,cuda}/topk_select.*).
  m.def("topk_select(Tensor scores, Tensor? lengths, int k) -> Tensor");
  // DeepSeek-V3.2's indexer scores + topk_select fused (csrc/cpu/lightning_indexer_topk.cpp): q float32
  // [B, Sq, Hi, D] (scale folded in), k [B, Sk, D], weights [B, Sq, Hi], contiguous -> int32 [B, Sq, top_k] as
  // topk_select orders them; causal: row i sees keys j <= i + Sk - Sq. isa as the attention ops' (0 portable).
  m.def("lightning_indexer_topk(Tensor q, Tensor k, Tensor weights, int top_k, bool causal, int isa=-1) -> Tensor");
  // Flash-style attention forward (csrc/cpu/sliding_window_attention.cpp, sparse_attention.cpp): q, k, v
  // float32/bfloat16/float16, fp32 accumulation, out in q's dtype. isa: -1 the best the CPU has (or env
  // DSATTN_CPU_ISA), 0 portable, 1 avx2, 2 avx512 (an ISA the CPU lacks is an error).
  // Sliding window: q/k/v [B, H, S, D], or packed [T, H, D] with cu_seqlens_q/k int32 [num_seqs + 1]; sinks
  // float32 [Hq] or None.
  m.def("sliding_window_attention(Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor? cu_seqlens_q, "
        "Tensor? cu_seqlens_k, int window, bool causal, float scale, int isa=-1) -> Tensor");
  // The same kernel over a paged KV cache (causal): q [T, Hq, D] packed by cu_seqlens_q int32 [n + 1],
  // k_cache / v_cache [num_blocks, block_size, Hkv, D], block_table int32 [n, max_blocks], seqlens_k int32 [n].
  m.def("paged_sliding_window_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor cu_seqlens_q, Tensor seqlens_k, Tensor? sinks, int window, float scale, int isa=-1) -> Tensor");
  // Sparse: indices int32/int64 [B, Sq, topk] (shared by the heads) or [B, Hkv, Sq, topk]; entries outside
  // [0, Sk) and, causal, after the query's position are skipped.
  m.def("sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, bool causal, float scale, int isa=-1) "
        "-> Tensor");
  // Linear attention forward (csrc/cpu/linear_attention.cpp): q [B, Hq, Sq, Dk], k [B, Hkv, Sk, Dk], v [B, Hkv,
  // Sk, Dv] float32/bfloat16/float16, S0 [B, Hq, Dk, Dv] / z0 [B, Hq, Dk] contiguous float32 or None; feature_map
  // 0 elu, 1 relu, 2 identity -> (out in q's dtype, final S, final z float32); isa as the attention ops'.
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, int feature_map, bool causal, "
        "bool normalize, float eps, int isa=-1) -> (Tensor, Tensor, Tensor)");
  // Hybrid attention forward (csrc/cpu/hybrid_attention.cpp): q [B, Hq, Sq, Dqk], k [B, Hkv, Sk, Dqk], v [B, Hkv,
  // Sk, Dv] float32/bfloat16/float16, causal; exact softmax over the first `prefix` and last `window` keys of each
  // query, feature-map weights (0 elu, 1 relu, 2 identity) over the rest, one normalizer; isa as the attention ops'.
  m.def("hybrid_attention(Tensor q, Tensor k, Tensor v, int prefix, int window, int feature_map, float scale, "
        "int isa=-1) -> Tensor");
  // The ISA the attention kernels run for `isa` (-1: auto): 0 portable, 1 avx2, 2 avx512; errors as above.
  m.def("attention_isa(int isa=-1) -> int");
}

// A Python module so that `import dsattn._C` loads the library and runs the registrations above.
static PyModuleDef dsattn_c_module = {PyModuleDef_HEAD_INIT, "_C", "dsattn compiled CPU ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dsattn_c_module); }
