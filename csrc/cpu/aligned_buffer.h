// Grow-only scratch on a 4 KiB boundary for the CPU kernels' per-thread buffers. A large malloc'd block starts
// 16 bytes past a page, so every 64-byte row of a vector or AMX tile load from it straddles two cache lines; how
// much that costs depended on the process (the allocator's state), which made the kernels' speed vary by run.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <memory>

namespace dsattn {

template <typename T>
class AlignedBuffer {
 public:
  T* data() { return ptr_.get(); }
  // Room for at least `count` elements; the contents are not kept when it grows.
  void reserve(int64_t count) {
    if (count <= size_) return;
    const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 4095) / 4096 * 4096;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(4096, bytes)));
    TORCH_CHECK(ptr_ != nullptr, "dsattn: out of memory for a kernel's scratch (", bytes, " bytes)");
    size_ = count;
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
  int64_t size_ = 0;
};

}  // namespace dsattn
