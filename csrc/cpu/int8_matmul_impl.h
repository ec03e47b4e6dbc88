// int8 weight x fp32 activations, included by cpu_isa_*.cpp inside namespace
// dsattn::cpu_attn::isa_<name> after `struct Vec` and `q8_load` (W int8 codes widened to a vector of fp32).
//
// The weight's int8 codes are widened to fp32 in registers and multiplied with fp32 x: every product q * x is
// exact in fp32 (q has 8 bits), so the only rounding is fp32 accumulation, as in the oracle's fp32 matmul. No
// activation quantization: decode is bound by streaming the weight (1 byte per weight either way), and the
// widening costs two cheap instructions per W weights shared by all rows of x in a tile. (AVX512-VNNI CPUs
// quantize x into int8 digits below 4 rows instead: int8_matmul_vnni.cpp, fp32 accuracy kept.)
// Tiles: NB weight rows x R rows of x (R x NB vector accumulators), each weight vector widened once per tile.
// Per output channel: out = s[n] * (q . x); per group (group % W == 0): the widened codes are scaled by their
// group's scale before the FMA (q * s is the dequantized weight, rounded once to fp32). Other group sizes and
// the K % W tail: scalar loops.

constexpr int Q8_NB = 4;  // weight rows per tile

template <int R, int NB>
inline void q8_tile(const Int8Args& a, int64_t r0, int64_t n0) {
  constexpr int64_t W = Vec::W;
  reg acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = Vec::zero();
  const int8_t* q = a.q + n0 * a.k;
  const float* x = a.x + r0 * a.ldx;
  const bool grouped = a.group > 0;
  const int64_t kv = grouped ? a.k : a.k / W * W;
  if (!grouped) {
    for (int64_t kk = 0; kk < kv; kk += W) {
      reg w[NB];
      for (int j = 0; j < NB; ++j) w[j] = q8_load(q + j * a.k + kk);
      for (int r = 0; r < R; ++r) {
        const reg xv = Vec::load(x + r * a.ldx + kk);
        for (int j = 0; j < NB; ++j) acc[r][j] = Vec::fma(xv, w[j], acc[r][j]);
      }
    }
  } else {
    const int64_t groups = a.k / a.group;
    for (int64_t g = 0; g < groups; ++g) {
      reg s[NB];
      for (int j = 0; j < NB; ++j) s[j] = Vec::set1(a.s[(n0 + j) * groups + g]);
      for (int64_t kk = g * a.group; kk < (g + 1) * a.group; kk += W) {
        reg w[NB];
        for (int j = 0; j < NB; ++j) w[j] = Vec::mul(q8_load(q + j * a.k + kk), s[j]);
        for (int r = 0; r < R; ++r) {
          const reg xv = Vec::load(x + r * a.ldx + kk);
          for (int j = 0; j < NB; ++j) acc[r][j] = Vec::fma(xv, w[j], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float v = Vec::reduce_add(acc[r][j]);
      for (int64_t kk = kv; kk < a.k; ++kk) v += x[r * a.ldx + kk] * static_cast<float>(q[j * a.k + kk]);
      if (!grouped) v *= a.s[n0 + j];
      a.out[(r0 + r) * a.n + n0 + j] = v + (a.bias != nullptr ? a.bias[n0 + j] : 0.f);
    }
}

// Group sizes that are not a multiple of W: one (row of x, weight row) dot product at a time, scalar.
inline void q8_scalar(const Int8Args& a, int64_t r, int64_t row) {
  const int64_t groups = a.k / a.group;
  float v = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = a.s[row * groups + g];
    for (int64_t kk = g * a.group; kk < (g + 1) * a.group; ++kk)
      v += a.x[r * a.ldx + kk] * (static_cast<float>(a.q[row * a.k + kk]) * s);
  }
  a.out[r * a.n + row] = v + (a.bias != nullptr ? a.bias[row] : 0.f);
}

template <int NB>
inline void q8_rows(const Int8Args& a, int64_t n0) {
  int64_t r = 0;
  for (; r + 4 <= a.m; r += 4) q8_tile<4, NB>(a, r, n0);
  for (; r + 2 <= a.m; r += 2) q8_tile<2, NB>(a, r, n0);
  for (; r < a.m; ++r) q8_tile<1, NB>(a, r, n0);
}

void int8_matmul(Tag, const Int8Args& a) {
  const bool vector = a.group == 0 || a.group % Vec::W == 0;
  const int64_t blocks = (a.n + Q8_NB - 1) / Q8_NB;
  // Tasks of whole weight-row tiles over N; each output element is written by exactly one task.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * Q8_NB, rows = std::min<int64_t>(Q8_NB, a.n - n0);
      if (!vector) {
        for (int64_t row = n0; row < n0 + rows; ++row)
          for (int64_t r = 0; r < a.m; ++r) q8_scalar(a, r, row);
      } else if (rows == Q8_NB) {
        q8_rows<Q8_NB>(a, n0);
      } else {
        for (int64_t row = n0; row < n0 + rows; ++row) q8_rows<1>(a, row);
      }
    }
  });
}
