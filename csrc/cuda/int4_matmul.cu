// CUDA int4 GEMV / small-M GEMM (decode, M <= 16) for dsattn_C::int4_matmul:
//   out[m, n] = sum_k x[m, k] * (q[n, k] - zeros[n, k / g]) * scales[n, k / g]  (+ bias[n])
// Layout (dsattn/quant/int4.py): qweight int32 [N, K/8], q[n, 8j + i] = bits [4i, 4i+4) of qweight[n, j].
//
// One warp owns kColsPerWarp output columns n and a tile of up to kTileM rows of x. Lane l reads packed
// words w0 = l * 4, l * 4 + 128, ... of each of its weight rows as one 16-byte load (uint4: 4 words, 32
// nibbles, k = 8 * w0 .. 8 * w0 + 31), so a warp streams 512 contiguous bytes per row and step. Each word is
// dequantized in registers to q - z (exact in fp32), dotted with the 8 x values of every row of x it meets and
// scaled once: acc += s * sum_e (q_e - z) x_e (fp32 throughout); the x values are loaded once per word and
// feed all of the warp's columns. The 32 lanes' partial sums are added with __shfl_xor_sync; lane 0 adds the bias and
// stores in x's dtype. A word never straddles two groups (group_size % 8 == 0): one (scale, zero) per word.
// When K % 32 != 0 or qweight is not 16-byte aligned, lanes read single words instead (VEC = false).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace dsattn {
namespace {

constexpr int kWarps = 4;        // per block
constexpr int kColsPerWarp = 2;  // output columns per warp: every x value loaded feeds both
constexpr int kColsPerBlock = kWarps * kColsPerWarp;
constexpr int kMaxTileM = 16;    // rows of x per block; more rows take more blocks along grid.y

// Scales and bias keep their own dtype (fp16/bf16/fp32): converted on load, no copy per call.
enum class FloatKind : int { kHalf, kBFloat16, kFloat };

FloatKind float_kind(at::ScalarType t) {
  return t == at::kHalf ? FloatKind::kHalf : t == at::kBFloat16 ? FloatKind::kBFloat16 : FloatKind::kFloat;
}

__device__ __forceinline__ float load_float(const void* p, int64_t i, FloatKind kind) {
  switch (kind) {
    case FloatKind::kHalf:
      return __half2float(static_cast<const __half*>(p)[i]);
    case FloatKind::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// The 8 x values k .. k+7 (one packed word's worth) as float: one 16-byte load for 16-bit x, two for fp32.
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

// 2^23 + nibble e of word, as a float (0x4B000000 is 2^23 and q fills the low mantissa bits): subtracting
// 2^23 + z then gives q - z exactly, with no int-to-float conversion (a quarter-rate instruction).
__device__ __forceinline__ float nibble_plus_2_23(uint32_t word, int e) {
  return __uint_as_float(0x4B000000u | ((word >> (4 * e)) & 0xFu));
}

template <typename T, int TILE_M, bool VEC>
__global__ void __launch_bounds__(kWarps * 32) int4_gemv_kernel(
    const T* __restrict__ x, const uint32_t* __restrict__ qweight, const void* __restrict__ scales,
    FloatKind scale_kind, const uint8_t* __restrict__ zeros, const void* __restrict__ bias, FloatKind bias_kind,
    T* __restrict__ out, int M, int N, int K, int group_size) {
  constexpr int WORDS = VEC ? 4 : 1;  // packed words per lane and step
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kColsPerWarp;
  const int m0 = blockIdx.y * TILE_M;
  if (n0 >= N) return;  // the whole warp leaves together (no block-wide sync below)
  const int words_per_row = K / 8;
  const int groups = K / group_size;
  // Columns beyond N and rows beyond M re-read the last valid one and are never stored: no branch inside.
  int64_t col[kColsPerWarp];
#pragma unroll
  for (int j = 0; j < kColsPerWarp; ++j) col[j] = min(n0 + j, N - 1);
  int64_t row_offset[TILE_M];
#pragma unroll
  for (int r = 0; r < TILE_M; ++r) row_offset[r] = static_cast<int64_t>(min(m0 + r, M - 1)) * K;

  float acc[TILE_M][kColsPerWarp];
#pragma unroll
  for (int r = 0; r < TILE_M; ++r)
#pragma unroll
    for (int j = 0; j < kColsPerWarp; ++j) acc[r][j] = 0.f;

  for (int w0 = lane * WORDS; w0 < words_per_row; w0 += 32 * WORDS) {
    uint32_t packed[kColsPerWarp][WORDS];
#pragma unroll
    for (int j = 0; j < kColsPerWarp; ++j) {
      const uint32_t* src = qweight + col[j] * words_per_row + w0;
      if constexpr (VEC) {
        const uint4 v = *reinterpret_cast<const uint4*>(src);
        packed[j][0] = v.x;
        packed[j][1] = v.y;
        packed[j][2] = v.z;
        packed[j][3] = v.w;
      } else {
        packed[j][0] = *src;
      }
    }
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
      const int k = (w0 + i) * 8;  // the word holds q[n, k .. k+7], all in group k / group_size
      const int g = k / group_size;
      float s[kColsPerWarp], qz[kColsPerWarp][8];
#pragma unroll
      for (int j = 0; j < kColsPerWarp; ++j) {
        s[j] = load_float(scales, col[j] * groups + g, scale_kind);
        const float magic_z = 8388608.f + static_cast<float>(zeros[col[j] * groups + g]);  // 2^23 + z, exact
#pragma unroll
        for (int e = 0; e < 8; ++e) qz[j][e] = nibble_plus_2_23(packed[j][i], e) - magic_z;  // q - z, exact
      }
      // The word's scale factors out of its 8 products: s * sum_e (q_e - z) x_e (one FMA per weight and row).
#pragma unroll
      for (int r = 0; r < TILE_M; ++r) {
        float xv[8];
        load8(x + row_offset[r] + k, xv);
#pragma unroll
        for (int j = 0; j < kColsPerWarp; ++j) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(qz[j][e], xv[e], dot);
          acc[r][j] = fmaf(s[j], dot, acc[r][j]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < TILE_M; ++r)
#pragma unroll
    for (int j = 0; j < kColsPerWarp; ++j)
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], offset);
  if (lane != 0) return;
#pragma unroll
  for (int j = 0; j < kColsPerWarp; ++j) {
    if (n0 + j >= N) continue;
    const float b = bias != nullptr ? load_float(bias, n0 + j, bias_kind) : 0.f;
#pragma unroll
    for (int r = 0; r < TILE_M; ++r)
      if (m0 + r < M) store(out + static_cast<int64_t>(m0 + r) * N + n0 + j, acc[r][j] + b);
  }
}

template <typename T, int TILE_M>
void launch_tile(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                 const at::Tensor* bias, at::Tensor& out, int group_size, bool vec) {
  const int m = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1)), n = static_cast<int>(q.size(0));
  const dim3 grid((n + kColsPerBlock - 1) / kColsPerBlock, (m + TILE_M - 1) / TILE_M);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = static_cast<const T*>(x.data_ptr());
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(q.data_ptr<int32_t>());
  const void* bp = bias != nullptr ? bias->data_ptr() : nullptr;
  const FloatKind bk = bias != nullptr ? float_kind(bias->scalar_type()) : FloatKind::kFloat;
  T* op = static_cast<T*>(out.data_ptr());
  if (vec) {
    int4_gemv_kernel<T, TILE_M, true><<<grid, kWarps * 32, 0, stream>>>(
        xp, qp, s.data_ptr(), float_kind(s.scalar_type()), z.data_ptr<uint8_t>(), bp, bk, op, m, n, k, group_size);
  } else {
    int4_gemv_kernel<T, TILE_M, false><<<grid, kWarps * 32, 0, stream>>>(
        xp, qp, s.data_ptr(), float_kind(s.scalar_type()), z.data_ptr<uint8_t>(), bp, bk, op, m, n, k, group_size);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, const at::Tensor* bias,
            at::Tensor& out, int group_size, bool vec) {
  const int64_t m = x.size(0);  // the smallest row tile that holds M (M > 16: tiles of 16 along grid.y)
  if (m <= 1) return launch_tile<T, 1>(x, q, s, z, bias, out, group_size, vec);
  if (m <= 2) return launch_tile<T, 2>(x, q, s, z, bias, out, group_size, vec);
  if (m <= 4) return launch_tile<T, 4>(x, q, s, z, bias, out, group_size, vec);
  if (m <= 8) return launch_tile<T, 8>(x, q, s, z, bias, out, group_size, vec);
  return launch_tile<T, kMaxTileM>(x, q, s, z, bias, out, group_size, vec);
}

bool is_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

}  // namespace

// x fp16/bf16/fp32 [M, K]; qweight int32 [N, K/8]; scales fp16/bf16/fp32 [N, K/g]; zeros uint8 [N, K/g];
// bias (optional) fp16/bf16/fp32 [N] -> [M, N] in x's dtype. Any M works; it is built for M <= 16.
at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && is_float(x.scalar_type()), "int4_matmul: x must be float16/bfloat16/float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "int4_matmul: qweight must be int32 [N, K/8]");
  TORCH_CHECK(scales.dim() == 2 && is_float(scales.scalar_type()), "int4_matmul: scales must be float16/bfloat16/float32");
  TORCH_CHECK(zeros.dim() == 2 && zeros.scalar_type() == at::kByte, "int4_matmul: zeros must be uint8");
  TORCH_CHECK(x.is_cuda() && qweight.device() == x.device() && scales.device() == x.device() &&
                  zeros.device() == x.device(),
              "int4_matmul: x, qweight, scales and zeros must be on one CUDA device");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == k, "int4_matmul: qweight [N, K/8] does not match K=", k);
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0 && k % group_size == 0,
              "int4_matmul: group_size must be a multiple of 8 dividing K");
  const int64_t groups = k / group_size;
  TORCH_CHECK(scales.size(0) == n && scales.size(1) == groups && zeros.size(0) == n && zeros.size(1) == groups,
              "int4_matmul: scales/zeros must be [N, K/group_size]");
  TORCH_CHECK(k < INT_MAX && n < INT_MAX && m < INT_MAX && (m + kMaxTileM - 1) / kMaxTileM <= 65535,
              "int4_matmul: sizes out of range for the CUDA kernel");
  const at::Tensor* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && is_float(bias->scalar_type()) && bias->device() == x.device(),
                "int4_matmul: bias must be a float tensor [N] on x's device");
    bias_ptr = &bias.value();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();  // 16-byte x loads
  const at::Tensor qc = qweight.contiguous(), sc = scales.contiguous(), zc = zeros.contiguous();
  at::Tensor bc;
  if (bias_ptr != nullptr) {
    bc = bias_ptr->contiguous();
    bias_ptr = &bc;
  }
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  if (k == 0) return bias_ptr != nullptr ? out.copy_(bc.unsqueeze(0).expand({m, n})) : out.zero_();
  const bool vec = (k / 8) % 4 == 0 && reinterpret_cast<uintptr_t>(qc.data_ptr()) % 16 == 0;
  const int g = static_cast<int>(group_size);
  switch (x.scalar_type()) {
    case at::kHalf:
      launch<__half>(xc, qc, sc, zc, bias_ptr, out, g, vec);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(xc, qc, sc, zc, bias_ptr, out, g, vec);
      break;
    default:
      launch<float>(xc, qc, sc, zc, bias_ptr, out, g, vec);
  }
  return out;
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn_C, CUDA, m) { m.impl("int4_matmul", &dsattn::int4_matmul_cuda); }
