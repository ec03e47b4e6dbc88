// 16 x 16 transpose of 32-bit elements held in 16 AVX-512 registers (the AMX GEMM's x packing and output, the
// AVX-512 attention kernels' K tiles and softmax rows). Include it inside an AVX-512F target region (after the
// file's `#pragma GCC target` / `clang attribute push`), where <immintrin.h> is already included: its functions
// take that target.
#pragma once

namespace dsattn {

// v[i] = row i -> v[j] = column j (v[j] lane i = old v[i] lane j): unpack 32- then 64-bit pairs within 128-bit
// lanes (each lane then holds a 4 x 4 block transposed), then two 128-bit shuffle stages put the blocks in place.
inline void transpose16x16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    v[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
    v[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    v[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

// fp32 rows: the same bit moves.
inline void transpose16x16(__m512 v[16]) {
  __m512i w[16];
  for (int i = 0; i < 16; ++i) w[i] = _mm512_castps_si512(v[i]);
  transpose16x16(w);
  for (int i = 0; i < 16; ++i) v[i] = _mm512_castsi512_ps(w[i]);
}

}  // namespace dsattn
