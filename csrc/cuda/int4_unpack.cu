// CUDA twin of csrc/cpu/int4_unpack.cpp: one thread per packed int32 word, 8 nibbles out as two 32-bit stores.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace dsattn {

__global__ void int4_unpack_kernel(const uint32_t* __restrict__ src, uint32_t* __restrict__ dst, int64_t words) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= words) return;
  const uint32_t word = src[w];
  // Nibbles 0..3 -> bytes of dst[2w], nibbles 4..7 -> bytes of dst[2w+1] (little endian).
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo |= ((word >> (4 * i)) & 0xFu) << (8 * i);
    hi |= ((word >> (4 * (i + 4))) & 0xFu) << (8 * i);
  }
  dst[2 * w] = lo;
  dst[2 * w + 1] = hi;
}

at::Tensor int4_unpack_cuda(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2, "int4_unpack: qweight must be 2-D [N, K/8], got ", qweight.dim(), "-D");
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "int4_unpack: qweight must be int32, got ", qweight.scalar_type());
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor packed = qweight.contiguous();
  at::Tensor out = at::empty({packed.size(0), packed.size(1) * 8}, packed.options().dtype(at::kByte));
  const int64_t words = packed.numel();
  if (words == 0) return out;
  const int threads = 256;
  const int64_t blocks = (words + threads - 1) / threads;
  int4_unpack_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()), reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()),
      words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn_C, CUDA, m) { m.impl("int4_unpack", &dsattn::int4_unpack_cuda); }
