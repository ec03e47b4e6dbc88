// The N-tile schedule of the int4 / int8 weight kernels (int4_matmul_avx512.cpp, int4_matmul_vnni.cpp,
// int8_matmul_vnni.cpp): tasks of whole NB-row weight tiles over N (each output element is written by exactly
// one task; a last partial tile runs row by row), each tile over all M rows of x in row tiles of the first R of
// Rs while they fit, then the next (the last R must be 1).
// The kernel is a callable tile(R, NB, r0, n0) taking std::integral_constant R and NB. Include inside the
// including file's ISA target region (as its kernels), after <ATen/Parallel.h>.
#pragma once

#include <cstdint>
#include <type_traits>

namespace dsattn {
namespace tile_schedule {

template <int... Rs>
struct RowTiles {
  template <int NB, class Tile>
  static inline void run(int64_t, int64_t, int64_t, const Tile&) {}
};

template <int R, int... Rest>
struct RowTiles<R, Rest...> {
  template <int NB, class Tile>
  static inline void run(int64_t m, int64_t r, int64_t n0, const Tile& tile) {
    for (; r + R <= m; r += R) tile(std::integral_constant<int, R>{}, std::integral_constant<int, NB>{}, r, n0);
    RowTiles<Rest...>::template run<NB>(m, r, n0, tile);
  }
};

template <int NB, int... Rs, class Tile>
inline void run(int64_t m, int64_t n, const Tile& tile) {
  const int64_t tiles = (n + NB - 1) / NB;
  at::parallel_for(0, tiles, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB;
      if (n0 + NB <= n) {
        RowTiles<Rs...>::template run<NB>(m, 0, n0, tile);
      } else {
        for (int64_t row = n0; row < n; ++row) RowTiles<Rs...>::template run<1>(m, 0, row, tile);
      }
    }
  });
}

}  // namespace tile_schedule
}  // namespace dsattn
