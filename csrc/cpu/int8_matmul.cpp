// CPU int8 weight-only matmul: out[m, n] = x[m, :] . (q[n, :] * scale) (+ bias[n]), q int8 [N, K], scales
// per output channel [N] or per group [N, K/g].
// - decode (M < kGemmMinRows): int8_matmul_impl.h for the ISA resolve_isa() picks (AVX-512 / AVX2 /
//   portable): int8 codes widened to fp32 in registers, exact products, fp32 accumulation; x is never
//   quantized (see the impl header for why). bf16 x is widened to fp32 and the result rounded once.
// - prefill (M >= kGemmMinRows): the weight dequantized a panel of rows at a time (fp32 panels for fp32 x,
//   bf16 panels for bf16 x) and multiplied by torch's GEMM (BLAS / oneDNN, AMX where the CPU has it); memory
//   O(kPanelElems), never the whole weight (unless it is that small).
//   AVX-512: one fused pass (int4_matmul_avx512.cpp) into L2-sized panels, the same values.
// - decode on AVX-512 CPUs with VNNI (M < kVnniMaxRows, K % 128 == 0, per channel or group % 128 == 0):
//   int8_matmul_vnni.cpp, x as int8 digits (3 for fp32 x, 2 for bf16 x), VPDPBUSD with exact int32 sums;
//   DSATTN_INT8_VNNI=0 keeps the widening kernels. isa= / DSATTN_CPU_ISA other than avx512 never take it.
//   Prefill stays on the GEMM: there the bf16 GEMM (AMX) beats an int8 dot product.
// - bf16 x from amx::kMinRows rows on AVX-512 CPUs with AMX, and from kGemmMinRows rows on AVX512-BF16 CPUs
//   without it (Zen 4; brgemm_dequant.h; K % 32 == 0, per channel or group % 16 == 0): q * s fused into
//   oneDNN's brgemm per weight tile, the bias added in fp32 and one rounding; DSATTN_INT8_AMX=0 keeps the paths
//   above.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu/attention_kernels.h"
#include "cpu/brgemm_dequant.h"
#include "cpu/int4_kernels.h"
#include "cpu/isa_dispatch.h"

namespace dsattn {
namespace int8_vnni {  // int8_matmul_vnni.cpp
bool supported();
// out[m, n] (fp32) for fp32 x [m, k] (row stride ldx), k % 128 == 0, group 0 or a multiple of 128.
void matmul(const float* x, int64_t ldx, int64_t m, int64_t n, int64_t k, const int8_t* q, const float* s,
            int64_t group, const float* bias, int levels, float* out);
}  // namespace int8_vnni
namespace {

constexpr int64_t kGemmMinRows = 64;
// VNNI decode below this many rows (int8_matmul_vnni.cpp tiles 2 rows of x per pass over the weight; the
// widening kernels run more rows per pass, which wins as M grows).
constexpr int64_t kVnniMaxRows = 4;
// Dequantized panel size in elements (32 MiB of fp32): each panel is one GEMM call, and narrow panels cost
// GEMM efficiency (and oneDNN's bf16 weight reorder per call), so panels are as wide as this allows.
constexpr int64_t kPanelElems = int64_t{8} << 20;
// The fused AVX-512 dequant: 1 Mi elements per panel (2 MiB bf16), written and read back in L2.
constexpr int64_t kFusedPanelElems = int64_t{1} << 20;

}  // namespace

// x float32/bfloat16 [M, K] (any strides); qweight int8 [N, K]; scales float32 [N] (group_size None) or
// [N, K/group_size]; bias float32 [N] or None -> [M, N] in x's dtype. isa as the attention ops'.
at::Tensor int8_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           c10::optional<int64_t> group_size, const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_matmul: x must be float32 or bfloat16 [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "int8_matmul: qweight must be int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "int8_matmul: scales must be float32");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == k, "int8_matmul: qweight [N, K] does not match K=", k);
  const int64_t group = group_size.has_value() ? *group_size : 0;
  if (group == 0) {
    TORCH_CHECK(!group_size.has_value(), "int8_matmul: group_size must be None or >= 1");
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "int8_matmul: scales must be [N] per output channel");
  } else {
    TORCH_CHECK(group > 0 && k % group == 0, "int8_matmul: group_size must be >= 1 and divide K");
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == k / group,
                "int8_matmul: scales must be [N, K/group_size]");
  }
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat,
                "int8_matmul: bias must be float32 [N]");
    bc = bias->contiguous();
    bp = bc.data_ptr<float>();
  }
  const cpu_attn::Isa chosen = cpu_attn::resolve_isa(isa);  // validated even where the GEMM path runs
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  amx::Kind brgemm = amx::Kind::kNone;
  if (bf16 && n > 0 && k > 0 && k % 32 == 0 && (group == 0 || group % 16 == 0) && chosen == cpu_attn::kAvx512)
    brgemm = amx::available("DSATTN_INT8_AMX");
  if ((brgemm == amx::Kind::kAmx && m >= amx::kMinRows) || (brgemm == amx::Kind::kAvx512Bf16 && m >= kGemmMinRows)) {
    // q * scale fused into the brgemm (int4_matmul_amx.cpp); x rows may be strided.
    const at::Tensor xs = x.stride(1) == 1 && x.stride(0) >= k ? x : x.contiguous();
    at::Tensor out = at::empty({m, n}, x.options());
    const amx::Int8Weight w{qp, sp, k, group};
    amx::gemm(reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>()), xs.stride(0), m, n, k,
              amx::dequant_int8, false, &w, bp, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  // AVX-512: q * scale in one pass straight into the GEMM's dtype, L2-sized panels (the values and rounding of
  // the path below). bf16 x below kGemmMinRows stays on the decode kernels: at 16 rows they beat dequant + bf16
  // GEMM (measured).
  const bool fused = chosen == cpu_attn::kAvx512 && int4_cpu::avx512::compiled() && (group == 0 || group % 16 == 0);
  if (m >= kGemmMinRows && n > 0 && k > 0) {
    const at::Tensor xc = x.contiguous();
    const int64_t panel_rows =
        std::min(std::max<int64_t>(1, (fused ? kFusedPanelElems : kPanelElems) / k), n);
    at::Tensor out = at::empty({m, n}, x.options());
    at::Tensor panel;
    if (fused) panel = at::empty({panel_rows, k}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    for (int64_t n0 = 0; n0 < n; n0 += panel_rows) {
      const int64_t rows = std::min(panel_rows, n - n0);
      at::Tensor w;
      if (fused) {
        w = panel.narrow(0, 0, rows);
        int4_cpu::avx512::dequant_int8_rows(qp, sp, n0, rows, k, group, bf16 ? nullptr : w.data_ptr<float>(),
                                            bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr);
      } else {
        // q * scale in fp32 by ATen's vectorized, parallel kernels (the decode kernels' weight values).
        w = qc.narrow(0, n0, rows).to(at::kFloat);
        if (group == 0) {
          w.mul_(sc.narrow(0, n0, rows).unsqueeze(1));
        } else {
          w.view({rows, k / group, group}).mul_(sc.narrow(0, n0, rows).unsqueeze(2));
        }
      }
      at::Tensor part;
      if (bf16) {  // bf16 GEMM (fp32 accumulation); the bias added after its rounding to bf16
        part = at::mm(xc, (w.scalar_type() == at::kBFloat16 ? w : w.to(at::kBFloat16)).t());
        if (bp != nullptr) part = at::add(part, bc.narrow(0, n0, rows).to(at::kBFloat16));
      } else {
        part = bp != nullptr ? at::addmm(bc.narrow(0, n0, rows), xc, w.t()) : at::mm(xc, w.t());
      }
      if (rows == n) return part;
      out.narrow(1, n0, rows).copy_(part);
    }
    return out;
  }
  // Decode: fp32 x with unit column stride (rows may be strided), fp32 out.
  at::Tensor xf = x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.stride(0) >= k ? x : x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return out.to(x.scalar_type());
  if (k == 0) return (bp != nullptr ? bc.expand({m, n}).clone() : out.zero_()).to(x.scalar_type());
  const char* vnni_env = std::getenv("DSATTN_INT8_VNNI");
  const bool vnni_off = vnni_env != nullptr && std::string(vnni_env) == "0";
  if (chosen == cpu_attn::kAvx512 && !vnni_off && m < kVnniMaxRows && k % 128 == 0 && group % 128 == 0 &&
      int8_vnni::supported()) {
    int8_vnni::matmul(xf.data_ptr<float>(), xf.stride(0), m, n, k, qp, sp, group, bp, bf16 ? 2 : 3,
                      out.data_ptr<float>());
    return bf16 ? out.to(at::kBFloat16) : out;
  }
  cpu_attn::Int8Args a{xf.data_ptr<float>(), xf.stride(0), qp, sp, bp, out.data_ptr<float>(), m, n, k, group};
  cpu_attn::dispatch_isa(chosen, [&](auto tag) { int8_matmul(tag, a); });
  return bf16 ? out.to(at::kBFloat16) : out;
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("int8_matmul", &dsattn::int8_matmul_cpu); }
