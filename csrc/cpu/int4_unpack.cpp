// CPU twin of triton_kernels/int4_unpack.py: unpack int32 words of eight 4-bit values into uint8 [N, K].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace dsattn {

at::Tensor int4_unpack_cpu(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2, "int4_unpack: qweight must be 2-D [N, K/8], got ", qweight.dim(), "-D");
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "int4_unpack: qweight must be int32, got ", qweight.scalar_type());
  const at::Tensor packed = qweight.contiguous();
  const int64_t n = packed.size(0), words = packed.size(1);
  at::Tensor out = at::empty({n, words * 8}, packed.options().dtype(at::kByte));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n * words, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      uint32_t word = src[w];
      for (int i = 0; i < 8; ++i) dst[w * 8 + i] = static_cast<uint8_t>((word >> (4 * i)) & 0xF);
    }
  });
  return out;
}

}  // namespace dsattn

TORCH_LIBRARY_IMPL(dsattn_C, CPU, m) { m.impl("int4_unpack", &dsattn::int4_unpack_cpu); }
