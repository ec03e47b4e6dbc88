// Cache-line aligned std::vector for the CPU attention kernels' per-worker scratch (query / score / output tiles,
// feature-map rows, index buckets). std::vector's own blocks start 16 bytes past a 64-byte line (a large one 16
// bytes past a page), so every full-width vector load or store of a tile row split across two cache lines.
// Same interface and zero-initialization as std::vector: only the allocation moves. The packed K/V tiles, which
// need no initialization, use dsattn::AlignedBuffer instead (aligned_buffer.h).
// Include it before any target pragma (ISA files): nothing in it depends on the ISA.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace dsattn {

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
