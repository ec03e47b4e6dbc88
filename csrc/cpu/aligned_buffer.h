// Aligned scratch for the CPU kernels' per-thread buffers. A std::vector's block starts 16 bytes past a 64-byte
// line (a large one 16 bytes past a page), so every 64-byte row of a vector or AMX tile load from it straddles two
// cache lines; how much that cost depended on where the allocator put the block, so the kernels' speed varied by
// process.
// - AlignedBuffer<T>: grow-only, on a 4 KiB boundary, uninitialized (packed tiles, the AMX GEMM's A / C / x^T).
// - ScratchVec<T>: a std::vector on a 64-byte boundary, same interface and zero-initialization (query / score /
//   output tiles, feature-map rows, index buckets).
// Nothing here depends on the ISA: include it before any target pragma.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

namespace dsattn {

template <typename T>
class AlignedBuffer {
 public:
  T* data() { return ptr_.get(); }
  // Room for at least `count` elements; the contents are not kept when it grows.
  void reserve(int64_t count) {
    if (count <= size_) return;
    // Aligned operator new (C++17), as CacheLineAllocator: std::aligned_alloc is missing from MSVC's library.
    const size_t bytes = static_cast<size_t>(count) * sizeof(T);
    ptr_.reset(static_cast<T*>(::operator new(bytes, std::align_val_t{kAlign}, std::nothrow)));
    TORCH_CHECK(ptr_ != nullptr, "dsattn: out of memory for a kernel's scratch (", bytes, " bytes)");
    size_ = count;
  }

 private:
  static constexpr std::size_t kAlign = 4096;
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t{kAlign}); }
  };
  std::unique_ptr<T, Free> ptr_;
  int64_t size_ = 0;
};

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::size_t kAlign = 64;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kAlign})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{kAlign}); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const {
    return false;
  }
};

template <typename T>
using ScratchVec = std::vector<T, CacheLineAllocator<T>>;

}  // namespace dsattn
