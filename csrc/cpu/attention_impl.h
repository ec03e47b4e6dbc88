// Flash-style CPU attention, included by cpu_isa_*.cpp inside namespace dsattn::cpu_attn::isa_<name>
// after `struct Vec` (the ISA's fp32 vector: W lanes, RM register rows, load/store/set1/fma/max/exp/...).
// No includes here: the including file provides <algorithm>, <cmath>, <limits>, <vector>, ATen/Parallel.h
// and c10's BFloat16/Half before its target pragma.
//
// Both kernels run the same loop over key tiles of BK keys, in fp32 whatever the input dtype:
//   S = Q_rows . Kt (Kt: the tile transposed to [D][BK], so each q element is broadcast against BK/W key
//   vectors: a register-blocked GEMM, RM rows x 4 vectors of accumulators), then per row an online softmax
//   update (running max m, sum l, the fp32 output row O rescaled when m grows), then O += P . V_tile.
// NaN hygiene: a key a row cannot see never enters that row's arithmetic. Its score may be computed (each
// score is its own dot product) but is overwritten by -inf by index before the softmax, and the P . V
// product of a tile that some row sees only in part runs per row over exactly its visible keys, so an
// invisible V row is never multiplied (0 x NaN would be NaN).

constexpr int64_t BK = 64;  // keys per tile
constexpr int64_t NVK = BK / Vec::W;
constexpr int64_t kRowsPerBlock = 32;  // query rows (all heads of a KV group) per sliding-window task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(NVK % 4 == 0, "a tile row is a whole number of 4-vector chunks");

using reg = typename Vec::reg;

template <typename T>
inline const T* typed(const void* p) {
  return static_cast<const T*>(p);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

// W consecutive elements of p as fp32.
template <typename T, typename V = Vec>
inline typename V::reg load_f32(const T* p) {
  if constexpr (IsF32<T>::value) {
    return V::load(p);
  } else if constexpr (V::kTranspose16) {
    return V::load16(p);
  } else {
    float t[V::W];
    for (int64_t i = 0; i < V::W; ++i) t[i] = static_cast<float>(p[i]);
    return V::load(t);
  }
}

// acc[j] (j < W) -> one vector whose lane j is the sum of acc[j]'s lanes.
template <typename V = Vec>
inline typename V::reg lane_sums(typename V::reg acc[]) {
  if constexpr (V::kTranspose16 && V::W == 16) {
    V::transpose16(acc);
    typename V::reg s[4];
    for (int c = 0; c < 4; ++c) s[c] = V::add(V::add(acc[c], acc[c + 4]), V::add(acc[c + 8], acc[c + 12]));
    return V::add(V::add(s[0], s[1]), V::add(s[2], s[3]));
  } else {
    float t[V::W];
    for (int64_t j = 0; j < V::W; ++j) t[j] = V::reduce_add(acc[j]);
    return V::load(t);
  }
}

// acc[j] (j < W) -> one vector whose lane j is the max of acc[j]'s lanes.
template <typename V = Vec>
inline typename V::reg lane_maxes(typename V::reg acc[]) {
  if constexpr (V::kTranspose16 && V::W == 16) {
    V::transpose16(acc);
    typename V::reg s[4];
    for (int c = 0; c < 4; ++c) s[c] = V::max(V::max(acc[c], acc[c + 4]), V::max(acc[c + 8], acc[c + 12]));
    return V::max(V::max(s[0], s[1]), V::max(s[2], s[3]));
  } else {
    float t[V::W];
    for (int64_t j = 0; j < V::W; ++j) t[j] = V::reduce_max(acc[j]);
    return V::load(t);
  }
}

// S[r][0..BK) = Q[r][0..D) . Kt[0..D)[0..BK) for r < RM (Q rows ldq apart).
template <int RM>
inline void qk_rows(const float* Q, int64_t ldq, const float* Kt, int64_t D, float* S) {
  constexpr int C = 4;
  for (int64_t c0 = 0; c0 < NVK; c0 += C) {
    reg acc[RM][C];
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::zero();
    const float* kt = Kt + c0 * Vec::W;
    for (int64_t d = 0; d < D; ++d) {
      reg kv[C];
      for (int c = 0; c < C; ++c) kv[c] = Vec::load(kt + d * BK + c * Vec::W);
      for (int r = 0; r < RM; ++r) {
        const reg qb = Vec::set1(Q[r * ldq + d]);
        for (int c = 0; c < C; ++c) acc[r][c] = Vec::fma(qb, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < C; ++c) Vec::store(S + r * BK + (c0 + c) * Vec::W, acc[r][c]);
  }
}

inline void qk_block(const float* Q, int64_t M, int64_t D, const float* Kt, float* S) {
  int64_t r = 0;
  for (; r + Vec::RM <= M; r += Vec::RM) qk_rows<Vec::RM>(Q + r * D, D, Kt, D, S + r * BK);
  for (; r < M; ++r) qk_rows<1>(Q + r * D, D, Kt, D, S + r * BK);
}

// Where P . V reads V row j: a packed tile (fp32 rows ldv apart) or the rows themselves (any dtype, unit stride).
struct PackedV {
  const float* Vt;
  int64_t ldv;
  inline reg load(int64_t j, int64_t off) const { return Vec::load(Vt + j * ldv + off); }
};
template <typename T>
struct DirectV {
  const T* const* rows;
  inline reg load(int64_t j, int64_t off) const { return load_f32(rows[j] + off); }
};

// O[r][dv0 .. dv0 + C*W) += sum_{ja <= j < jb} P[r][j] * V[j][..] for r < RM (P rows BK apart, O rows ldo).
template <int RM, int C, typename VA>
inline void pv_chunk(const float* P, const VA& V, int64_t ja, int64_t jb, float* O, int64_t ldo, int64_t dv0) {
  reg acc[RM][C];
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::load(O + r * ldo + dv0 + c * Vec::W);
  int64_t j = ja;
  if constexpr (RM == 1) {  // one row: two keys at a time into two accumulator sets (FMA latency)
    reg acc2[C];
    for (int c = 0; c < C; ++c) acc2[c] = Vec::zero();
    for (; j + 2 <= jb; j += 2) {
      const reg p0 = Vec::set1(P[j]), p1 = Vec::set1(P[j + 1]);
      for (int c = 0; c < C; ++c) {
        acc[0][c] = Vec::fma(p0, V.load(j, dv0 + c * Vec::W), acc[0][c]);
        acc2[c] = Vec::fma(p1, V.load(j + 1, dv0 + c * Vec::W), acc2[c]);
      }
    }
    for (int c = 0; c < C; ++c) acc[0][c] = Vec::add(acc[0][c], acc2[c]);
  }
  for (; j < jb; ++j) {
    reg vv[C];
    for (int c = 0; c < C; ++c) vv[c] = V.load(j, dv0 + c * Vec::W);
    for (int r = 0; r < RM; ++r) {
      const reg pb = Vec::set1(P[r * BK + j]);
      for (int c = 0; c < C; ++c) acc[r][c] = Vec::fma(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < C; ++c) Vec::store(O + r * ldo + dv0 + c * Vec::W, acc[r][c]);
}

// O rows are DvP (a whole number of vectors) apart.
template <int RM, typename VA>
inline void pv_rows(const float* P, const VA& V, int64_t ja, int64_t jb, int64_t DvP, float* O) {
  const int64_t nv = DvP / Vec::W;
  int64_t c0 = 0;
  for (; c0 + 4 <= nv; c0 += 4) pv_chunk<RM, 4>(P, V, ja, jb, O, DvP, c0 * Vec::W);
  switch (nv - c0) {
    case 3: pv_chunk<RM, 3>(P, V, ja, jb, O, DvP, c0 * Vec::W); break;
    case 2: pv_chunk<RM, 2>(P, V, ja, jb, O, DvP, c0 * Vec::W); break;
    case 1: pv_chunk<RM, 1>(P, V, ja, jb, O, DvP, c0 * Vec::W); break;
    default: break;
  }
}

// Every row of the block sees keys [ja, jb) of the tile.
template <typename VA>
inline void pv_block(const float* P, int64_t M, const VA& V, int64_t ja, int64_t jb, int64_t DvP, float* O) {
  int64_t r = 0;
  for (; r + Vec::RM <= M; r += Vec::RM) pv_rows<Vec::RM>(P + r * BK, V, ja, jb, DvP, O + r * DvP);
  for (; r < M; ++r) pv_rows<1>(P + r * BK, V, ja, jb, DvP, O + r * DvP);
}

// Tasks [0, total) in chunks claimed from a shared counter by at most torch.get_num_threads() workers, each
// with its own scratch (made by make_scratch): a worker slowed by other load on its core takes fewer chunks
// instead of holding up a static share.
template <typename MakeScratch, typename Body>
void parallel_tasks(int64_t total, int64_t chunk, const MakeScratch& make_scratch, const Body& body) {
  if (total <= 0) return;
  const int64_t chunks = (total + chunk - 1) / chunk;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      for (int64_t t = c * chunk; t < std::min(total, (c + 1) * chunk); ++t) body(t, scratch);
  });
}

// Online softmax update of one row over a tile's scores s[0..BK) (invisible ones already -inf): s becomes
// the row's weights exp(s - m_new); l, m and the output row o (DvP floats) are updated.
inline void softmax_row(float* s, float& m, float& l, float* o, int64_t DvP) {
  reg mx = Vec::set1(kNegInf);
  for (int64_t c = 0; c < NVK; ++c) mx = Vec::max(mx, Vec::load(s + c * Vec::W));
  const float tile_max = Vec::reduce_max(mx);
  const float m_new = std::max(m, tile_max);
  if (m_new == kNegInf) {  // nothing with weight yet: every weight is 0 (exp(-inf - -inf) would be NaN)
    for (int64_t c = 0; c < NVK; ++c) Vec::store(s + c * Vec::W, Vec::zero());
    return;
  }
  const reg mv = Vec::set1(m_new);
  reg sum = Vec::zero();
  for (int64_t c = 0; c < NVK; ++c) {
    const reg p = Vec::exp(Vec::sub(Vec::load(s + c * Vec::W), mv));
    Vec::store(s + c * Vec::W, p);
    sum = Vec::add(sum, p);
  }
  const float alpha = std::exp(m - m_new);  // m = -inf: 0 (o and l are still 0)
  l = l * alpha + Vec::reduce_add(sum);
  if (!(alpha == 1.f)) {
    const reg av = Vec::set1(alpha);
    for (int64_t c = 0; c < DvP; c += Vec::W) Vec::store(o + c, Vec::mul(av, Vec::load(o + c)));
  }
  m = m_new;
}

// softmax_row for rows [0, M) of a tile at once (S rows BK apart, O rows DvP apart; m, l and the scratch
// ms, alpha hold round_up(M, W) floats): the per-row maxima, new maxima, rescale factors and sums are taken
// W rows at a time across lanes, without a branch per row. A row with no weight yet (new max -inf) subtracts
// 0 instead, so its -inf scores give weight 0.
inline void softmax_block(float* S, int64_t M, float* m, float* l, float* O, int64_t DvP, float* ms, float* alpha) {
  constexpr int64_t W = Vec::W;
  const reg ninf = Vec::set1(kNegInf);
  for (int64_t r0 = 0; r0 < M; r0 += W) {
    const int64_t n = std::min<int64_t>(W, M - r0);
    reg red[W];
    for (int64_t i = 0; i < W; ++i) {
      const float* s = S + (r0 + std::min(i, n - 1)) * BK;
      reg mx = ninf;
      for (int64_t c = 0; c < NVK; ++c) mx = Vec::max(mx, Vec::load(s + c * W));
      red[i] = mx;
    }
    const reg mold = Vec::load(m + r0);
    const reg mnew = Vec::max(lane_maxes(red), mold);  // a NaN maximum keeps the old one (std::max(m, NaN))
    Vec::store(m + r0, mnew);
    Vec::store(ms, mnew);
    for (int64_t i = 0; i < W; ++i) ms[i] = ms[i] == kNegInf ? 0.f : ms[i];
    const reg msv = Vec::load(ms);
    Vec::store(alpha + r0, Vec::exp(Vec::sub(mold, msv)));  // mold = -inf: 0 (O and l are still 0)
    for (int64_t i = 0; i < n; ++i) {
      float* s = S + (r0 + i) * BK;
      const reg mv = Vec::set1(ms[i]);
      reg sum = Vec::zero();
      for (int64_t c = 0; c < NVK; ++c) {
        const reg p = Vec::exp(Vec::sub(Vec::load(s + c * W), mv));
        Vec::store(s + c * W, p);
        sum = Vec::add(sum, p);
      }
      red[i] = sum;
      const reg av = Vec::set1(alpha[r0 + i]);
      float* o = O + (r0 + i) * DvP;
      for (int64_t c = 0; c < DvP; c += W) Vec::store(o + c, Vec::mul(av, Vec::load(o + c)));
    }
    for (int64_t i = n; i < W; ++i) red[i] = Vec::zero();
    Vec::store(l + r0, Vec::fma(Vec::load(l + r0), Vec::load(alpha + r0), lane_sums(red)));
  }
}

template <typename T>
inline void store_row(T* dst, int64_t stride, const float* o, int64_t dv, float mult) {
  for (int64_t d = 0; d < dv; ++d) dst[d * stride] = static_cast<T>(o[d] * mult);
}

// 1 / the row's softmax denominator (with the sink's e^(sink - m) when given); 0 for a row that saw no key.
inline float row_multiplier(float m, float l, const float* sink) {
  if (m == kNegInf) return 0.f;  // no key with weight: the output is 0 (O is 0)
  if (sink != nullptr) {
    const float s = *sink;
    if (s > m) {
      const float f = std::exp(m - s);
      return f / (l * f + 1.f);
    }
    l += std::exp(s - m);
  }
  return l == 0.f ? 0.f : 1.f / l;
}

// Q rows (already scaled) of the block into Qp[M][D].
template <typename T>
inline void pack_q_row(const T* src, int64_t sd, int64_t D, float scale, float* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * sd]) * scale;
}

// Key row j of a tile: column jj of Kt[D][BK] and row jj of Vt[BK][DvP] (zero padded past Dv).
template <typename T>
inline void pack_kv_row(const T* krow, int64_t kd, const T* vrow, int64_t vd, int64_t D, int64_t Dv, int64_t DvP,
                        float* Kt, float* Vt, int64_t jj) {
  float* vt = Vt + jj * DvP;
  if (kd == 1 && vd == 1) {  // the usual layout: unit-stride loops the compiler vectorizes
    for (int64_t d = 0; d < D; ++d) Kt[d * BK + jj] = static_cast<float>(krow[d]);
    for (int64_t d = 0; d < Dv; ++d) vt[d] = static_cast<float>(vrow[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) Kt[d * BK + jj] = static_cast<float>(krow[d * kd]);
    for (int64_t d = 0; d < Dv; ++d) vt[d] = static_cast<float>(vrow[d * vd]);
  }
  for (int64_t d = Dv; d < DvP; ++d) vt[d] = 0.f;
}

// Keys jj0 .. jj0 + 15 of a tile (K rows krows[i], V rows vrows[i]): as pack_kv_row, with K transposed 16 x 16
// in registers where the ISA has it (the element-wise transpose costs more than the tile's dot products).
template <typename T, typename V = Vec>  // V: dependent, so that ISAs without load16/transpose16 compile
inline void pack_kv_16(const T* const* krows, int64_t kd, const T* const* vrows, int64_t vd, int64_t D, int64_t Dv,
                       int64_t DvP, float* Kt, float* Vt, int64_t jj0) {
  if constexpr (V::kTranspose16) {
    if (kd == 1) {
      int64_t d0 = 0;
      for (; d0 + 16 <= D; d0 += 16) {
        typename V::reg r[16];
        for (int i = 0; i < 16; ++i) r[i] = V::load16(krows[i] + d0);
        V::transpose16(r);
        for (int c = 0; c < 16; ++c) V::store(Kt + (d0 + c) * BK + jj0, r[c]);
      }
      for (int i = 0; i < 16; ++i) {
        for (int64_t d = d0; d < D; ++d) Kt[d * BK + jj0 + i] = static_cast<float>(krows[i][d]);
        float* vt = Vt + (jj0 + i) * DvP;
        if (vd == 1)
          for (int64_t d = 0; d < Dv; ++d) vt[d] = static_cast<float>(vrows[i][d]);
        else
          for (int64_t d = 0; d < Dv; ++d) vt[d] = static_cast<float>(vrows[i][d * vd]);
        for (int64_t d = Dv; d < DvP; ++d) vt[d] = 0.f;
      }
      return;
    }
  }
  for (int i = 0; i < 16; ++i) pack_kv_row(krows[i], kd, vrows[i], vd, D, Dv, DvP, Kt, Vt, jj0 + i);
}

inline void zero_kv_row(int64_t D, int64_t DvP, float* Kt, float* Vt, int64_t jj) {
  for (int64_t d = 0; d < D; ++d) Kt[d * BK + jj] = 0.f;
  for (int64_t d = 0; d < DvP; ++d) Vt[jj * DvP + d] = 0.f;
}

// The packed K / V tiles of one call. Uninitialized: the packing writes every element (zero rows outside
// [0, Sk)). Up to kKeepFloats per slot are kept per calling thread and reused: a fresh buffer of this size comes
// from mmap and page-faults on first touch at every call, which costs more than a decode call's arithmetic. On a
// 4 KiB boundary (AlignedBuffer), so that the tiles' rows sit on whole cache lines.
struct PackBuffer {
  static constexpr int64_t kKeepFloats = int64_t(1) << 23;  // 32 MiB per slot
  float* ptr;
  AlignedBuffer<float> own;
  PackBuffer(int64_t n, int slot) {
    thread_local AlignedBuffer<float> kept[2];
    if (n > kKeepFloats) {
      own.reserve(n);
      ptr = own.data();
      return;
    }
    kept[slot].reserve(n);
    ptr = kept[slot].data();
  }
  float* get() const { return ptr; }
};

// ---------------------------------------------------------------------------------------------------------
// Sliding window. Query i of a sequence sits at p = i + Sk - Sq and sees keys [lo_i, hi_i] (causal:
// p - window < j <= p; else |p - j| < window), both bounds non-decreasing in i.

struct Range {
  int64_t lo, hi;  // empty when lo > hi
};

inline Range visible(int64_t i, int64_t sq, int64_t sk, int64_t window, bool causal) {
  const int64_t p = i + sk - sq;
  Range r{std::max<int64_t>(p - window + 1, 0), std::min<int64_t>(causal ? p : p + window - 1, sk - 1)};
  return r;
}

// Where key j of sequence s, KV head h lives. Both sliding-window paths read K/V rows only through these, so
// the padded, varlen and paged ops share one kernel: dense K/V (per-sequence offsets) or a paged cache (row
// j % block_size of block block_table[s][j / block_size]; only blocks holding visible keys are ever read).
template <typename T>
struct DenseKV {
  const T* k;
  const T* v;
  const Seq* seqs;
  Strides ks, vs;
  inline const T* krow(int64_t s, int64_t h, int64_t j) const { return k + seqs[s].k_off + h * ks.h + j * ks.r; }
  inline const T* vrow(int64_t s, int64_t h, int64_t j) const { return v + seqs[s].v_off + h * vs.h + j * vs.r; }
};

template <typename T>
struct PagedKV {
  const T* k;
  const T* v;
  const int32_t* table;
  int64_t table_stride, block_size, kblk, vblk;
  Strides ks, vs;
  inline int64_t block(int64_t s, int64_t j) const { return table[s * table_stride + j / block_size]; }
  inline const T* krow(int64_t s, int64_t h, int64_t j) const {
    return k + block(s, j) * kblk + (j % block_size) * ks.r + h * ks.h;
  }
  inline const T* vrow(int64_t s, int64_t h, int64_t j) const {
    return v + block(s, j) * vblk + (j % block_size) * vs.r + h * vs.h;
  }
};

// The keys any query of sequence sq sees: one range, since both bounds of the rows' ranges are non-decreasing
// and step by at most 1 (empty: hi < lo).
inline Range seq_keys(const Seq& sq, int64_t window, bool causal) {
  Range u{INT64_MAX, -1};
  for (int64_t i = 0; i < sq.sq; ++i) {
    const Range r = visible(i, sq.sq, sq.sk, window, causal);
    if (r.lo <= r.hi) {
      u.lo = std::min(u.lo, r.lo);
      u.hi = std::max(u.hi, r.hi);
    }
  }
  return u;
}

struct PackedSeq {
  int64_t t0, ntile, k_off, v_off;  // first key tile, tile count, offsets into the packed K and V buffers
};

// Tile path (prefill): the sequences marked in on_tiles.
template <typename T, typename KV>
void sliding_tiles(const SlidingArgs& a, const KV& kv, const std::vector<char>& on_tiles, int64_t window) {
  const int64_t G = a.hq / a.hkv, D = a.dqk, Dv = a.dv, DvP = round_up(std::max<int64_t>(Dv, 1), Vec::W);
  const T* q = typed<T>(a.q);
  T* out = static_cast<T*>(a.out);

  // 1. The key tiles any query of a sequence sees, per KV head, converted to fp32 once: Kt [tile][D][BK],
  //    V [tile * BK][DvP] (keys outside [0, Sk) zero). Tiles are aligned to BK in key index, so query blocks
  //    share them; keys before the first / after the last visible one are never packed.
  std::vector<PackedSeq> packed(a.nseq);
  std::vector<int64_t> tile_prefix(a.nseq * a.hkv + 1, 0);
  int64_t k_total = 0, v_total = 0;
  for (int64_t s = 0; s < a.nseq; ++s) {
    const Range u = on_tiles[s] ? seq_keys(a.seqs[s], window, a.causal) : Range{INT64_MAX, -1};
    PackedSeq& ps = packed[s];
    ps.t0 = u.hi >= 0 ? u.lo / BK : 0;
    ps.ntile = u.hi >= 0 ? u.hi / BK - u.lo / BK + 1 : 0;
    ps.k_off = k_total;
    ps.v_off = v_total;
    k_total += a.hkv * ps.ntile * D * BK;
    v_total += a.hkv * ps.ntile * BK * DvP;
    for (int64_t h = 0; h < a.hkv; ++h) tile_prefix[s * a.hkv + h + 1] = tile_prefix[s * a.hkv + h] + ps.ntile;
  }
  PackBuffer kbuf(k_total, 0), vbuf(v_total, 1);
  const int64_t units = tile_prefix.back();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t sh = std::upper_bound(tile_prefix.begin(), tile_prefix.end(), u) - tile_prefix.begin() - 1;
      const int64_t s = sh / a.hkv, h = sh % a.hkv, t = u - tile_prefix[sh];
      const Seq& sq = a.seqs[s];
      const PackedSeq& ps = packed[s];
      float* Kt = kbuf.get() + ps.k_off + (h * ps.ntile + t) * D * BK;
      float* Vt = vbuf.get() + ps.v_off + (h * ps.ntile + t) * BK * DvP;
      const int64_t j0 = (ps.t0 + t) * BK;
      int64_t jj = 0;
      for (; jj + 16 <= BK && j0 + jj + 16 <= sq.sk; jj += 16) {
        const T* krows[16];
        const T* vrows[16];
        for (int i = 0; i < 16; ++i) {
          krows[i] = kv.krow(s, h, j0 + jj + i);
          vrows[i] = kv.vrow(s, h, j0 + jj + i);
        }
        pack_kv_16(krows, a.ks.d, vrows, a.vs.d, D, Dv, DvP, Kt, Vt, jj);
      }
      for (; jj < BK; ++jj) {
        const int64_t j = j0 + jj;
        if (j < sq.sk)
          pack_kv_row(kv.krow(s, h, j), a.ks.d, kv.vrow(s, h, j), a.vs.d, D, Dv, DvP, Kt, Vt, jj);
        else
          zero_kv_row(D, DvP, Kt, Vt, jj);
      }
    }
  });

  // 2. Tasks: (sequence, KV head, block of query rows); a block's rows are its G query heads x BQ positions
  //    (row r = g * nq + ii), so each K/V tile is loaded once for the whole query group.
  const int64_t BQ = std::max<int64_t>(1, kRowsPerBlock / G);
  std::vector<int64_t> task_prefix(a.nseq + 1, 0);
  for (int64_t s = 0; s < a.nseq; ++s)
    task_prefix[s + 1] = task_prefix[s] + (on_tiles[s] ? a.hkv * ((a.seqs[s].sq + BQ - 1) / BQ) : 0);
  const int64_t MaxM = G * BQ, MaxMP = round_up(MaxM, Vec::W);
  struct Scratch {
    ScratchVec<float> Qp, S, O, m, l, ms, alpha;
    ScratchVec<Range> rows, seen;
  };
  const auto make_scratch = [&] {
    return Scratch{ScratchVec<float>(MaxM * std::max<int64_t>(D, 1)), ScratchVec<float>(MaxM * BK),
                   ScratchVec<float>(MaxM * DvP), ScratchVec<float>(MaxMP), ScratchVec<float>(MaxMP),
                   ScratchVec<float>(Vec::W), ScratchVec<float>(MaxMP), ScratchVec<Range>(BQ),
                   ScratchVec<Range>(MaxM)};
  };
  parallel_tasks(task_prefix.back(), 2, make_scratch, [&](int64_t task, Scratch& sc) {
    auto &Qp = sc.Qp, &S = sc.S, &O = sc.O, &m = sc.m, &l = sc.l;
    auto &rows = sc.rows, &seen = sc.seen;
    const int64_t s = std::upper_bound(task_prefix.begin(), task_prefix.end(), task) - task_prefix.begin() - 1;
    const Seq& sq = a.seqs[s];
    const int64_t local = task - task_prefix[s], nblk = (sq.sq + BQ - 1) / BQ;
    const int64_t h = local / nblk, i0 = (local % nblk) * BQ, nq = std::min(BQ, sq.sq - i0), M = G * nq;
    int64_t blk_lo = INT64_MAX, blk_hi = -1;
    for (int64_t ii = 0; ii < nq; ++ii) {
      rows[ii] = visible(i0 + ii, sq.sq, sq.sk, window, a.causal);
      if (rows[ii].lo <= rows[ii].hi) {
        blk_lo = std::min(blk_lo, rows[ii].lo);
        blk_hi = std::max(blk_hi, rows[ii].hi);
      }
    }
    for (int64_t r = 0; r < M; ++r) {
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::fill(O.begin(), O.begin() + M * DvP, 0.f);
    if (blk_hi >= 0) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t ii = 0; ii < nq; ++ii)
          pack_q_row(q + sq.q_off + (h * G + g) * a.qs.h + (i0 + ii) * a.qs.r, a.qs.d, D, a.scale,
                     Qp.data() + (g * nq + ii) * D);
      const PackedSeq& ps = packed[s];
      for (int64_t t = blk_lo / BK; t <= blk_hi / BK; ++t) {
        const int64_t j0 = t * BK, nk = std::min(BK, sq.sk - j0);
        const float* Kt = kbuf.get() + ps.k_off + (h * ps.ntile + t - ps.t0) * D * BK;
        const PackedV Vt{vbuf.get() + ps.v_off + (h * ps.ntile + t - ps.t0) * BK * DvP, DvP};
        bool full = nk == BK;
        for (int64_t ii = 0; ii < nq && full; ++ii) full = rows[ii].lo <= j0 && rows[ii].hi >= j0 + BK - 1;
        qk_block(Qp.data(), M, D, Kt, S.data());
        for (int64_t r = 0; r < M; ++r) {
          const Range& rr = rows[r % nq];
          seen[r] = Range{std::max(rr.lo, j0) - j0, std::min(rr.hi, j0 + nk - 1) - j0};
          float* srow = S.data() + r * BK;
          if (seen[r].lo > seen[r].hi) {  // the row sees none of the tile: weights 0, its state unchanged
            for (int64_t c = 0; c < BK; c += Vec::W) Vec::store(srow + c, Vec::set1(kNegInf));
          } else if (!full) {
            for (int64_t jj = 0; jj < seen[r].lo; ++jj) srow[jj] = kNegInf;
            for (int64_t jj = seen[r].hi + 1; jj < BK; ++jj) srow[jj] = kNegInf;
          }
        }
        softmax_block(S.data(), M, m.data(), l.data(), O.data(), DvP, sc.ms.data(), sc.alpha.data());
        // Keys every row of the block sees go through the register-blocked product; each row's other
        // visible keys (window edges, the causal diagonal) through its own loop.
        int64_t ca = 0, cb = BK - 1;
        for (int64_t r = 0; r < M; ++r) {
          ca = std::max(ca, seen[r].lo);
          cb = std::min(cb, seen[r].hi);
        }
        if (ca <= cb) pv_block(S.data(), M, Vt, ca, cb + 1, DvP, O.data());
        if (!full) {
          for (int64_t r = 0; r < M; ++r) {
            if (seen[r].lo > seen[r].hi) continue;
            float* orow = O.data() + r * DvP;
            const float* prow = S.data() + r * BK;
            if (ca > cb) {
              pv_rows<1>(prow, Vt, seen[r].lo, seen[r].hi + 1, DvP, orow);
            } else {
              if (seen[r].lo < ca) pv_rows<1>(prow, Vt, seen[r].lo, ca, DvP, orow);
              if (seen[r].hi > cb) pv_rows<1>(prow, Vt, cb + 1, seen[r].hi + 1, DvP, orow);
            }
          }
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t hq = h * G + g;
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t r = g * nq + ii;
        const float mult = row_multiplier(m[r], l[r], a.sinks ? a.sinks + hq : nullptr);
        store_row(out + sq.o_off + hq * a.os.h + (i0 + ii) * a.os.r, a.os.d, O.data() + r * DvP, Dv, mult);
      }
    }
  });
}

// Row path (decode): a sequence whose query rows (all G heads of the KV group) fit one small block. Nothing
// is packed: each task reads its K and V rows where they are, once for all its rows (and heads), BK keys at a time: per
// row the W-key groups it sees as W dot products reduced across lanes together, an online softmax step, then
// O += P . V over its visible keys with the G rows of a position blocked in registers. Few tasks (B x Hkv small
// against the threads): each window is split into key ranges computed as separate items and merged by their
// log-sum-exp (flash-decoding). The split depends on the shape only, so results do not depend on threads.
constexpr int64_t kRowPathRows = 16;     // a sequence takes the row path when Sq == 1 or G x Sq <= this
constexpr int64_t kSplitMinKeys = 512;   // keys per split item at least
constexpr int64_t kSplitItems = 32;      // split until the row path has about this many items

inline bool row_path_ok(const SlidingArgs& a) {
  return a.ks.d == 1 && a.vs.d == 1 && a.dqk > 0 && a.dv > 0 && a.dqk % Vec::W == 0 && a.dv % Vec::W == 0;
}

// s[0..BK) = q . K row kp[jj] (q: D floats, scaled) for lo <= jj <= hi, -inf elsewhere. kp[jj] must point to
// a readable row for every jj of the W-groups [lo, hi] touches (scores outside [lo, hi] are overwritten).
template <typename T>
inline void qk_direct_row(const float* q, const T* const* kp, int64_t lo, int64_t hi, int64_t D, float* s) {
  constexpr int64_t W = Vec::W;
  const int64_t g_lo = lo / W * W;
  for (int64_t c = 0; c < BK; c += W) Vec::store(s + c, Vec::set1(kNegInf));
  for (int64_t g0 = g_lo; g0 <= hi; g0 += W) {
    reg acc[W];
    for (int64_t j = 0; j < W; ++j) {
      const T* kr = kp[g0 + j];
      reg a0 = Vec::zero(), a1 = Vec::zero();
      int64_t d = 0;
      for (; d + 2 * W <= D; d += 2 * W) {
        a0 = Vec::fma(Vec::load(q + d), load_f32(kr + d), a0);
        a1 = Vec::fma(Vec::load(q + d + W), load_f32(kr + d + W), a1);
      }
      if (d < D) a0 = Vec::fma(Vec::load(q + d), load_f32(kr + d), a0);
      acc[j] = Vec::add(a0, a1);
    }
    Vec::store(s + g0, lane_sums(acc));
  }
  for (int64_t jj = g_lo; jj < lo; ++jj) s[jj] = kNegInf;
  for (int64_t jj = hi + 1; jj < std::min(BK, (hi / W + 1) * W); ++jj) s[jj] = kNegInf;
}

template <typename T, typename KV>
void sliding_rows(const SlidingArgs& a, const KV& kv, const std::vector<int64_t>& seqs, int64_t window) {
  const int64_t G = a.hq / a.hkv, D = a.dqk, Dv = a.dv;
  const T* q = typed<T>(a.q);
  T* out = static_cast<T*>(a.out);
  // KV heads side by side within a key row ([.., S, H, D]: paged caches, packed varlen): a task takes all of
  // them, so that it reads whole rows instead of one head's slice of each.
  const int64_t nh = a.ks.h < a.ks.r && a.vs.h < a.vs.r ? a.hkv : 1;
  struct Group {
    int64_t s, h0, item0, nsplit, part0;  // heads [h0, h0 + nh); part0: first partial row slot (nsplit > 1)
  };
  struct Item {
    int64_t group, ja, jb, split;  // keys [ja, jb)
  };
  std::vector<Group> groups;
  std::vector<Item> items;
  const int64_t base = static_cast<int64_t>(seqs.size()) * (a.hkv / nh);
  const int64_t want = std::max<int64_t>(1, (kSplitItems + base - 1) / base);
  int64_t parts = 0, max_rows = 1;
  for (int64_t s : seqs) {
    const Range u = seq_keys(a.seqs[s], window, a.causal);
    const int64_t len = u.hi >= u.lo ? u.hi - u.lo + 1 : 0;
    const int64_t nsplit = std::max<int64_t>(1, std::min(want, len / kSplitMinKeys));
    const int64_t step = round_up((len + nsplit - 1) / std::max<int64_t>(nsplit, 1), BK);
    const int64_t R = nh * G * a.seqs[s].sq;
    max_rows = std::max(max_rows, R);
    for (int64_t h0 = 0; h0 < a.hkv; h0 += nh) {
      groups.push_back(Group{s, h0, static_cast<int64_t>(items.size()), nsplit, parts});
      if (nsplit > 1) parts += nsplit * R;
      for (int64_t sp = 0; sp < nsplit; ++sp) {
        const int64_t ja = len ? u.lo + sp * step : 0, jb = len ? std::min(u.hi + 1, ja + step) : 0;
        items.push_back(Item{static_cast<int64_t>(groups.size()) - 1, ja, std::max(ja, jb), sp});
      }
    }
  }
  std::vector<float> part_ml(parts * 2), part_o(parts * Dv);
  struct Scratch {
    ScratchVec<float> Qp, S, O, m, l;
    ScratchVec<Range> rows;
    ScratchVec<const T*> kp0, vp0, kp, vp;
  };
  const auto make_scratch = [&] {
    return Scratch{ScratchVec<float>(max_rows * D), ScratchVec<float>(max_rows * BK), ScratchVec<float>(max_rows * Dv),
                   ScratchVec<float>(max_rows), ScratchVec<float>(max_rows), ScratchVec<Range>(max_rows),
                   ScratchVec<const T*>(BK), ScratchVec<const T*>(BK), ScratchVec<const T*>(BK),
                   ScratchVec<const T*>(BK)};
  };
  parallel_tasks(static_cast<int64_t>(items.size()), 1, make_scratch, [&](int64_t idx, Scratch& sc) {
    const Item& it = items[idx];
    const Group& gr = groups[it.group];
    const int64_t s = gr.s, h0 = gr.h0;
    const Seq& sq = a.seqs[s];
    // Row hh * M + ii * G + g: head h0 + hh's query head g at position ii (a position's G rows adjacent).
    const int64_t nq = sq.sq, M = G * nq, R = nh * M;
    float *Qp = sc.Qp.data(), *S = sc.S.data(), *O = sc.O.data(), *m = sc.m.data(), *l = sc.l.data();
    for (int64_t r = 0; r < R; ++r) {
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    std::fill(O, O + R * Dv, 0.f);
    if (it.ja < it.jb) {
      for (int64_t ii = 0; ii < nq; ++ii) {
        const Range r = visible(ii, sq.sq, sq.sk, window, a.causal);
        sc.rows[ii] = Range{std::max(r.lo, it.ja), std::min(r.hi, it.jb - 1)};
        for (int64_t hh = 0; hh < nh; ++hh)
          for (int64_t g = 0; g < G; ++g)
            pack_q_row(q + sq.q_off + ((h0 + hh) * G + g) * a.qs.h + ii * a.qs.r, a.qs.d, D, a.scale,
                       Qp + (hh * M + ii * G + g) * D);
      }
      for (int64_t j0 = it.ja; j0 < it.jb; j0 += BK) {
        const int64_t nk = std::min(BK, it.jb - j0);
        for (int64_t jj = 0; jj < BK; ++jj) {
          const int64_t j = j0 + std::min(jj, nk - 1);
          sc.kp0[jj] = kv.krow(s, h0, j);
          sc.vp0[jj] = kv.vrow(s, h0, j);
        }
        for (int64_t hh = 0; hh < nh; ++hh) {
          for (int64_t jj = 0; jj < BK; ++jj) {
            sc.kp[jj] = sc.kp0[jj] + hh * a.ks.h;
            sc.vp[jj] = sc.vp0[jj] + hh * a.vs.h;
          }
          const DirectV<T> V{sc.vp.data()};
          for (int64_t ii = 0; ii < nq; ++ii) {
            const int64_t lo = std::max(sc.rows[ii].lo, j0) - j0, hi = std::min(sc.rows[ii].hi, j0 + nk - 1) - j0;
            if (lo > hi) continue;
            const int64_t r0 = hh * M + ii * G;
            for (int64_t g = 0; g < G; ++g) {
              qk_direct_row(Qp + (r0 + g) * D, sc.kp.data(), lo, hi, D, S + g * BK);
              softmax_row(S + g * BK, m[r0 + g], l[r0 + g], O + (r0 + g) * Dv, Dv);
            }
            pv_block(S, G, V, lo, hi + 1, Dv, O + r0 * Dv);
          }
        }
      }
    }
    if (gr.nsplit > 1) {
      const int64_t slot = gr.part0 + it.split * R;
      for (int64_t r = 0; r < R; ++r) {
        part_ml[(slot + r) * 2] = m[r];
        part_ml[(slot + r) * 2 + 1] = l[r];
      }
      std::copy(O, O + R * Dv, part_o.begin() + slot * Dv);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t ii = (r % M) / G, hq = (h0 + r / M) * G + r % G;
      store_row(out + sq.o_off + hq * a.os.h + ii * a.os.r, a.os.d, O + r * Dv, Dv,
                row_multiplier(m[r], l[r], a.sinks ? a.sinks + hq : nullptr));
    }
  });
  if (parts == 0) return;
  // Merge the splits of each row: each partial sum rescaled to the common max.
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(Dv);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Group& gr = groups[gi];
      if (gr.nsplit == 1) continue;
      const Seq& sq = a.seqs[gr.s];
      const int64_t M = G * sq.sq, R = nh * M;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t ii = (r % M) / G, hq = (gr.h0 + r / M) * G + r % G;
        float mx = kNegInf;
        for (int64_t sp = 0; sp < gr.nsplit; ++sp) mx = std::max(mx, part_ml[(gr.part0 + sp * R + r) * 2]);
        float total = 0.f;
        std::fill(o.begin(), o.end(), 0.f);
        if (mx != kNegInf) {
          for (int64_t sp = 0; sp < gr.nsplit; ++sp) {
            const int64_t at = gr.part0 + sp * R + r;
            const float ms = part_ml[at * 2];
            if (ms == kNegInf) continue;  // a split with no weight (its O is 0)
            const float f = std::exp(ms - mx);
            total += part_ml[at * 2 + 1] * f;
            const float* po = part_o.data() + at * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] += f * po[d];
          }
        }
        store_row(out + sq.o_off + hq * a.os.h + ii * a.os.r, a.os.d, o.data(), Dv,
                  row_multiplier(mx, total, a.sinks ? a.sinks + hq : nullptr));
      }
    }
  });
}

template <typename T, typename KV>
void sliding_window_run(const SlidingArgs& a, const KV& kv) {
  const int64_t G = a.hq / a.hkv;
  // window clamped so that p +- window cannot overflow (a window past every key changes nothing).
  int64_t max_len = 0;
  for (int64_t s = 0; s < a.nseq; ++s) max_len = std::max(max_len, a.seqs[s].sq + a.seqs[s].sk);
  const int64_t window = std::min<int64_t>(a.window, max_len + 1);
  const bool rows_ok = row_path_ok(a);
  std::vector<char> on_tiles(a.nseq, 0);
  std::vector<int64_t> on_rows;
  bool any_tiles = false;
  for (int64_t s = 0; s < a.nseq; ++s) {
    const int64_t n = a.seqs[s].sq;
    if (n == 0) continue;
    if (rows_ok && (n == 1 || n * G <= kRowPathRows)) {
      on_rows.push_back(s);
    } else {
      on_tiles[s] = 1;
      any_tiles = true;
    }
  }
  if (any_tiles) sliding_tiles<T>(a, kv, on_tiles, window);
  if (!on_rows.empty()) sliding_rows<T>(a, kv, on_rows, window);
}

template <typename T>
void sliding_window_typed(const SlidingArgs& a) {
  const T* k = typed<T>(a.k);
  const T* v = typed<T>(a.v);
  if (a.block_table != nullptr)
    sliding_window_run<T>(a, PagedKV<T>{k, v, a.block_table, a.table_stride, a.block_size, a.kblk, a.vblk, a.ks, a.vs});
  else
    sliding_window_run<T>(a, DenseKV<T>{k, v, a.seqs, a.ks, a.vs});
}

void sliding_window(Tag, const SlidingArgs& a) {
  switch (a.dtype) {
    case kFloat32: sliding_window_typed<float>(a); break;
    case kBFloat16: sliding_window_typed<c10::BFloat16>(a); break;
    case kFloat16: sliding_window_typed<c10::Half>(a); break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sparse: per (batch, KV head, query row) the listed keys that are in [0, Sk) (and, causal, at or before the
// query's position) are gathered into tiles; the G query heads of the KV group are the block's rows.

// Sparse, row path (unit-stride K/V rows, Dqk and Dv whole vectors): no tile is packed. Per query row the
// listed keys are taken W at a time straight from K / V: W dot products (each over the row's D, then the W
// accumulators reduced across lanes at once), one online softmax step over the W scores, then O += p_j V_j.
// A task is (batch, block of query rows, group of KV heads); its rows' lists are bucketed by key chunks of
// about L2 size, and the chunks are the outer loop, so every row of the task reads the chunk's K/V rows from
// cache instead of the whole K/V per row. Only listed visible keys are ever read (NaN hygiene for free).

// One row (q: D floats, scaled) over its n listed keys `keys` of one KV head: the online softmax state (m, the
// per-lane denominators lsum[W], o[Dv]) is updated.
template <typename T>
inline void sparse_row_keys(const float* q, const T* kh, int64_t ksr, const T* vh, int64_t vsr, const int32_t* keys,
                            int64_t n, int64_t D, int64_t Dv, float& m, float* lsum, float* o) {
  constexpr int64_t W = Vec::W;
  alignas(64) float pw[W];
  for (int64_t g0 = 0; g0 < n; g0 += W) {
    const int64_t cnt = std::min<int64_t>(W, n - g0);
    reg acc[W];
    for (int64_t j = 0; j < W; ++j) {
      const T* kr = kh + static_cast<int64_t>(keys[g0 + std::min(j, cnt - 1)]) * ksr;
      reg a0 = Vec::zero(), a1 = Vec::zero();
      int64_t d = 0;
      for (; d + 2 * W <= D; d += 2 * W) {
        a0 = Vec::fma(Vec::load(q + d), load_f32(kr + d), a0);
        a1 = Vec::fma(Vec::load(q + d + W), load_f32(kr + d + W), a1);
      }
      if (d < D) a0 = Vec::fma(Vec::load(q + d), load_f32(kr + d), a0);
      acc[j] = Vec::add(a0, a1);
    }
    reg s = lane_sums(acc);
    if (cnt < W) {
      Vec::store(pw, s);
      for (int64_t j = cnt; j < W; ++j) pw[j] = kNegInf;
      s = Vec::load(pw);
    }
    const float m_new = std::max(m, Vec::reduce_max(s));
    if (m_new == kNegInf) continue;  // no weight yet (every score so far -inf)
    const float alpha = std::exp(m - m_new);  // m = -inf: 0 (o and lsum are still 0)
    if (!(alpha == 1.f)) {
      const reg av = Vec::set1(alpha);
      Vec::store(lsum, Vec::mul(av, Vec::load(lsum)));
      for (int64_t c = 0; c < Dv; c += W) Vec::store(o + c, Vec::mul(av, Vec::load(o + c)));
    }
    m = m_new;
    const reg p = Vec::exp(Vec::sub(s, Vec::set1(m_new)));
    Vec::store(lsum, Vec::add(Vec::load(lsum), p));
    Vec::store(pw, p);
    for (int64_t c0 = 0; c0 < Dv; c0 += 4 * W) {
      const int64_t nc = std::min<int64_t>(4, (Dv - c0) / W);
      reg o0[4], o1[4];
      for (int64_t c = 0; c < nc; ++c) {
        o0[c] = Vec::load(o + c0 + c * W);
        o1[c] = Vec::zero();
      }
      int64_t j = 0;
      for (; j + 2 <= cnt; j += 2) {
        const T* v0 = vh + static_cast<int64_t>(keys[g0 + j]) * vsr + c0;
        const T* v1 = vh + static_cast<int64_t>(keys[g0 + j + 1]) * vsr + c0;
        const reg p0 = Vec::set1(pw[j]), p1 = Vec::set1(pw[j + 1]);
        for (int64_t c = 0; c < nc; ++c) {
          o0[c] = Vec::fma(p0, load_f32(v0 + c * W), o0[c]);
          o1[c] = Vec::fma(p1, load_f32(v1 + c * W), o1[c]);
        }
      }
      if (j < cnt) {
        const T* v0 = vh + static_cast<int64_t>(keys[g0 + j]) * vsr + c0;
        const reg p0 = Vec::set1(pw[j]);
        for (int64_t c = 0; c < nc; ++c) o0[c] = Vec::fma(p0, load_f32(v0 + c * W), o0[c]);
      }
      for (int64_t c = 0; c < nc; ++c) Vec::store(o + c0 + c * W, Vec::add(o0[c], o1[c]));
    }
  }
}

// Large KV groups keep the tile path (one gathered tile serves the group's query heads as a small GEMM); so do
// few rows with long lists (its split over keys, flash-decoding) and strided or partial-vector rows.
inline bool sparse_rows_path(const SparseArgs& a) {
  const int64_t tasks = a.batch * a.hkv * a.sq;
  return a.hq <= 2 * a.hkv && a.ks.d == 1 && a.vs.d == 1 && a.dqk > 0 && a.dv > 0 && a.dqk % Vec::W == 0 &&
         a.dv % Vec::W == 0 && !(tasks < 16 && a.topk > 4 * BK);
}

template <typename T, typename I>
void sparse_rows_typed(const SparseArgs& a) {
  constexpr int64_t W = Vec::W;
  const int64_t G = a.hq / a.hkv, D = a.dqk, Dv = a.dv;
  const T* q = typed<T>(a.q);
  const T* k = typed<T>(a.k);
  const T* v = typed<T>(a.v);
  const I* idx = typed<I>(a.indices);
  T* out = static_cast<T*>(a.out);
  // Key chunks of ~768 KB of K + V rows (a core's L2 holds one with room for the rows' state).
  const int64_t chunk = std::max<int64_t>(W, (768 << 10) / ((D + Dv) * static_cast<int64_t>(sizeof(T))));
  const int64_t nchunk = std::max<int64_t>(1, (a.sk + chunk - 1) / chunk);
  const int64_t BQ = std::max<int64_t>(1, std::min<int64_t>(32, a.sq));
  const int64_t nblk = (a.sq + BQ - 1) / BQ;
  // Enough tasks for the threads: KV heads go to separate tasks when there are few row blocks (decode).
  const bool shared = a.idx_sh == 0;
  const int64_t hgroup = (shared && a.batch * nblk >= 4 * std::max(1, at::get_num_threads())) ? a.hkv : 1;
  const int64_t ngroup = a.hkv / hgroup;
  const int64_t tasks = a.batch * nblk * ngroup;
  const int64_t states = hgroup * G * BQ;
  struct Scratch {
    ScratchVec<int32_t> keys;   // [BQ][topk] bucketed by chunk
    ScratchVec<int64_t> start;  // [BQ][nchunk + 1]
    ScratchVec<float> Qp, O, L, M;
  };
  const auto make_scratch = [&] {
    return Scratch{ScratchVec<int32_t>(BQ * std::max<int64_t>(a.topk, 1)), ScratchVec<int64_t>(BQ * (nchunk + 1)),
                   ScratchVec<float>(states * D), ScratchVec<float>(states * Dv), ScratchVec<float>(states * W),
                   ScratchVec<float>(states)};
  };
  parallel_tasks(tasks, 1, make_scratch, [&](int64_t task, Scratch& sc) {
    const int64_t hg = task % ngroup, blk = (task / ngroup) % nblk, b = task / (ngroup * nblk);
    const int64_t i0 = blk * BQ, nq = std::min(BQ, a.sq - i0);
    // Bucket each row's valid listings by key chunk (counting sort, listing order kept within a chunk).
    const auto bucket = [&](int64_t h) {
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r, p = i + a.sk - a.sq;
        const I* list = idx + b * a.idx_sb + h * a.idx_sh + i * a.idx_sr;
        int64_t* st = sc.start.data() + r * (nchunk + 1);
        std::fill(st, st + nchunk + 1, 0);
        for (int64_t t = 0; t < a.topk; ++t) {
          const int64_t j = static_cast<int64_t>(list[t * a.idx_st]);
          if (j >= 0 && j < a.sk && (!a.causal || j <= p)) ++st[j / chunk + 1];
        }
        for (int64_t c = 0; c < nchunk; ++c) st[c + 1] += st[c];
        int64_t fill[64];
        int64_t* pos = nchunk <= 64 ? fill : nullptr;
        std::vector<int64_t> big;
        if (!pos) {
          big.assign(st, st + nchunk);
          pos = big.data();
        } else {
          std::copy(st, st + nchunk, pos);
        }
        int32_t* keys = sc.keys.data() + r * a.topk;
        for (int64_t t = 0; t < a.topk; ++t) {
          const int64_t j = static_cast<int64_t>(list[t * a.idx_st]);
          if (j >= 0 && j < a.sk && (!a.causal || j <= p)) keys[pos[j / chunk]++] = static_cast<int32_t>(j);
        }
      }
    };
    std::fill(sc.O.begin(), sc.O.end(), 0.f);
    std::fill(sc.L.begin(), sc.L.end(), 0.f);
    std::fill(sc.M.begin(), sc.M.end(), kNegInf);
    for (int64_t hh = 0; hh < hgroup; ++hh)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < nq; ++r)
          pack_q_row(q + b * a.qb + ((hg * hgroup + hh) * G + g) * a.qs.h + (i0 + r) * a.qs.r, a.qs.d, D, a.scale,
                     sc.Qp.data() + ((hh * G + g) * BQ + r) * D);
    if (shared) bucket(0);
    for (int64_t hh = 0; hh < hgroup; ++hh) {  // per-head lists: one head per group (hgroup 1)
      if (!shared) bucket(hg * hgroup + hh);
    }
    for (int64_t c = 0; c < nchunk; ++c) {
      for (int64_t hh = 0; hh < hgroup; ++hh) {
        const int64_t h = hg * hgroup + hh;
        const T* kh = k + b * a.kb + h * a.ks.h;
        const T* vh = v + b * a.vb + h * a.vs.h;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t* st = sc.start.data() + r * (nchunk + 1);
            const int64_t n = st[c + 1] - st[c];
            if (n == 0) continue;
            const int64_t s = (hh * G + g) * BQ + r;
            sparse_row_keys(sc.Qp.data() + s * D, kh, a.ks.r, vh, a.vs.r, sc.keys.data() + r * a.topk + st[c], n, D,
                            Dv, sc.M[s], sc.L.data() + s * W, sc.O.data() + s * Dv);
          }
      }
    }
    for (int64_t hh = 0; hh < hgroup; ++hh)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t s = (hh * G + g) * BQ + r;
          const float l = Vec::reduce_add(Vec::load(sc.L.data() + s * W));
          store_row(out + b * a.ob + ((hg * hgroup + hh) * G + g) * a.os.h + (i0 + r) * a.os.r, a.os.d,
                    sc.O.data() + s * Dv, Dv, row_multiplier(sc.M[s], l, nullptr));
        }
  });
}

template <typename T, typename I>
void sparse_typed(const SparseArgs& a) {
  const int64_t G = a.hq / a.hkv, D = a.dqk, Dv = a.dv, DvP = round_up(std::max<int64_t>(Dv, 1), Vec::W);
  if (sparse_rows_path(a)) {
    sparse_rows_typed<T, I>(a);
    return;
  }
  const T* q = typed<T>(a.q);
  const T* k = typed<T>(a.k);
  const T* v = typed<T>(a.v);
  const I* idx = typed<I>(a.indices);
  T* out = static_cast<T*>(a.out);
  const int64_t tasks = a.batch * a.hkv * a.sq;
  struct Scratch {
    ScratchVec<float> Qp, S, O, m, l, Kt, Vt;
    ScratchVec<int64_t> keys;
  };
  const auto make_scratch = [&] {
    return Scratch{ScratchVec<float>(G * std::max<int64_t>(D, 1)), ScratchVec<float>(G * BK),
                   ScratchVec<float>(G * DvP), ScratchVec<float>(G), ScratchVec<float>(G),
                   ScratchVec<float>(std::max<int64_t>(D, 1) * BK), ScratchVec<float>(BK * DvP),
                   ScratchVec<int64_t>(a.topk)};
  };
  // Decode (few tasks, long lists): each task's list is split into chunks of kSplitKeys listings, computed as
  // separate items and merged (flash-decoding). The split depends on the shape only, never on the thread
  // count, so results do not either.
  constexpr int64_t kSplitKeys = 4 * BK;
  const int64_t nsplit = tasks < 16 ? std::max<int64_t>(1, (a.topk + kSplitKeys - 1) / kSplitKeys) : 1;
  std::vector<float> part_ml(nsplit > 1 ? tasks * nsplit * G * 2 : 0), part_o(nsplit > 1 ? tasks * nsplit * G * DvP : 0);
  parallel_tasks(tasks * nsplit, nsplit > 1 ? 1 : 16, make_scratch, [&](int64_t item, Scratch& sc) {
    auto &Qp = sc.Qp, &S = sc.S, &O = sc.O, &m = sc.m, &l = sc.l, &Kt = sc.Kt, &Vt = sc.Vt;
    auto& keys = sc.keys;
    {
      const int64_t task = item / nsplit, split = item % nsplit;
      const int64_t i = task % a.sq, h = (task / a.sq) % a.hkv, b = task / (a.sq * a.hkv);
      const int64_t p = i + a.sk - a.sq;
      const I* list = idx + b * a.idx_sb + h * a.idx_sh + i * a.idx_sr;
      int64_t n = 0;
      for (int64_t t = 0; t < a.topk; ++t) {
        const int64_t j = static_cast<int64_t>(list[t * a.idx_st]);
        if (j >= 0 && j < a.sk && (!a.causal || j <= p)) keys[n++] = j;
      }
      for (int64_t g = 0; g < G; ++g) {
        m[g] = kNegInf;
        l[g] = 0.f;
      }
      std::fill(O.begin(), O.end(), 0.f);
      const int64_t key_begin = nsplit > 1 ? split * kSplitKeys : 0;
      const int64_t key_end = nsplit > 1 ? std::min(n, key_begin + kSplitKeys) : n;
      if (key_begin < key_end) {
        for (int64_t g = 0; g < G; ++g)
          pack_q_row(q + b * a.qb + (h * G + g) * a.qs.h + i * a.qs.r, a.qs.d, D, a.scale, Qp.data() + g * D);
        const T* kh = k + b * a.kb + h * a.ks.h;
        const T* vh = v + b * a.vb + h * a.vs.h;
        for (int64_t t0 = key_begin; t0 < key_end; t0 += BK) {
          const int64_t nk = std::min(BK, key_end - t0);
          int64_t jj = 0;
          for (; jj + 16 <= nk; jj += 16) {
            const T* krows[16];
            const T* vrows[16];
            for (int i = 0; i < 16; ++i) {
              krows[i] = kh + keys[t0 + jj + i] * a.ks.r;
              vrows[i] = vh + keys[t0 + jj + i] * a.vs.r;
            }
            pack_kv_16(krows, a.ks.d, vrows, a.vs.d, D, Dv, DvP, Kt.data(), Vt.data(), jj);
          }
          for (; jj < nk; ++jj) {
            const int64_t j = keys[t0 + jj];
            pack_kv_row(kh + j * a.ks.r, a.ks.d, vh + j * a.vs.r, a.vs.d, D, Dv, DvP, Kt.data(), Vt.data(), jj);
          }
          for (int64_t jj = nk; jj < BK; ++jj) zero_kv_row(D, DvP, Kt.data(), Vt.data(), jj);
          qk_block(Qp.data(), G, D, Kt.data(), S.data());
          for (int64_t g = 0; g < G; ++g) {
            float* srow = S.data() + g * BK;
            for (int64_t jj = nk; jj < BK; ++jj) srow[jj] = kNegInf;
            softmax_row(srow, m[g], l[g], O.data() + g * DvP, DvP);
          }
          pv_block(S.data(), G, PackedV{Vt.data(), DvP}, 0, nk, DvP, O.data());
        }
      }
      if (nsplit > 1) {
        for (int64_t g = 0; g < G; ++g) {
          part_ml[(item * G + g) * 2] = m[g];
          part_ml[(item * G + g) * 2 + 1] = l[g];
        }
        std::copy(O.begin(), O.begin() + G * DvP, part_o.begin() + item * G * DvP);
        return;
      }
      for (int64_t g = 0; g < G; ++g)
        store_row(out + b * a.ob + (h * G + g) * a.os.h + i * a.os.r, a.os.d, O.data() + g * DvP, Dv,
                  row_multiplier(m[g], l[g], nullptr));
    }
  });
  if (nsplit == 1) return;
  // Merge the splits of each (task, head): rescale each partial sum to the common max.
  at::parallel_for(0, tasks * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(DvP);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t task = row / G, g = row % G;
      const int64_t i = task % a.sq, h = (task / a.sq) % a.hkv, b = task / (a.sq * a.hkv);
      float mx = kNegInf;
      for (int64_t sp = 0; sp < nsplit; ++sp) mx = std::max(mx, part_ml[((task * nsplit + sp) * G + g) * 2]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      if (mx != kNegInf) {
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const int64_t at = (task * nsplit + sp) * G + g;
          const float ms = part_ml[at * 2];
          if (ms == kNegInf) continue;  // a split with no weight (its O is 0)
          const float f = std::exp(ms - mx);
          total += part_ml[at * 2 + 1] * f;
          const float* po = part_o.data() + at * DvP;
          for (int64_t d = 0; d < DvP; ++d) o[d] += f * po[d];
        }
      }
      store_row(out + b * a.ob + (h * G + g) * a.os.h + i * a.os.r, a.os.d, o.data(), Dv,
                row_multiplier(mx, total, nullptr));
    }
  });
}

template <typename T>
void sparse_dtype(const SparseArgs& a) {
  if (a.idx64)
    sparse_typed<T, int64_t>(a);
  else
    sparse_typed<T, int32_t>(a);
}

void sparse(Tag, const SparseArgs& a) {
  switch (a.dtype) {
    case kFloat32: sparse_dtype<float>(a); break;
    case kBFloat16: sparse_dtype<c10::BFloat16>(a); break;
    case kFloat16: sparse_dtype<c10::Half>(a); break;
  }
}

bool compiled() { return true; }
