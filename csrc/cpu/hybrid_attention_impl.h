// Hybrid (layered) attention forward, included by cpu_isa_*.cpp right after attention_impl.h, inside the
// same ISA namespace: it is built from that file's Vec, packed tiles, register-blocked products and online
// softmax. Semantics: dsattn/reference/hybrid_attention.py. No include guard: included once per ISA.
//
// Query i at p = i + Sk - Sq sees the exact keys [0, min(prefix, p + 1)) and [max(prefix, p - window + 1), p]
// (window > 0) and the far keys [prefix, p - window];
//   o_i = (sum_exact e^(s - m) v + sum_far phi(q).phi(k) v) / (the same weights summed), 0 where that sum is 0.
// K/V are packed once per call into fp32 tiles of BK keys (K transposed), as the sliding-window tile path does.
// A task is (batch, KV head, run of query blocks); a block's rows are its G query heads x BQ positions (row
// r = g * nq + ii), so each tile serves the whole query group. Per block:
//   exact: the prefix range, then the band range of each row, tile by tile: S = Q K^T, scores outside the row's
//          range -inf, the online softmax (m, l, O_exact), O_exact += P V;
//   far:   a running state S_far = sum phi(k)^T v, z = sum phi(k) over the far keys every row of the block sees,
//          grown a whole tile at a time (so it is the same for any split of the blocks into tasks) and applied
//          as phi(Q) S_far, phi(Q).z; the far keys between the state and each row's own bound (fewer than
//          BK + BQ) as a masked tile phi(Q) phi(K)^T whose weights and P V products run over the row's keys only.
// The parts meet at the end of a row: out = (O_exact + O_far) / (l + den_far). A key or value a row cannot see
// is never multiplied into its sums (0 x NaN): products over columns shared by every row of the block go through
// the blocked GEMM, the rest per row (pv_seen).

// phi of the feature map codes (HybridFeatureMap) on a vector / a float; NaN stays NaN.
inline reg hybrid_phi(reg x, int fmap) {
  const reg zero = Vec::zero();
  if (fmap == kHybridRelu) return Vec::max(zero, x);
  // elu(x) + 1 = max(x, 0) + e^min(x, 0), with min(x, 0) = -max(0, -x) (Vec has max; +inf stays inf)
  const reg neg = Vec::sub(zero, Vec::max(zero, Vec::sub(zero, x)));
  return Vec::add(Vec::max(zero, x), Vec::exp(neg));
}

inline float hybrid_phi(float x, int fmap) {
  if (fmap == kHybridRelu) return x < 0.f ? 0.f : x;
  return x > 0.f ? x + 1.f : std::exp(x);
}

// phi of n floats from src into dst (identity: a copy).
inline void hybrid_phi_n(const float* src, int64_t n, int fmap, float* dst) {
  if (fmap == kHybridIdentity) {
    std::copy(src, src + n, dst);
    return;
  }
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) Vec::store(dst + i, hybrid_phi(Vec::load(src + i), fmap));
  for (; i < n; ++i) dst[i] = hybrid_phi(src[i], fmap);
}

// O += P V over each row's own columns seen[r] of a tile (P rows BK apart, O rows DvP apart): the columns every
// row sees through the blocked product, each row's others through its own loop.
inline void pv_seen(const float* P, int64_t M, const PackedV& V, const Range* seen, int64_t DvP, float* O) {
  int64_t ca = 0, cb = BK - 1;
  for (int64_t r = 0; r < M; ++r) {
    ca = std::max(ca, seen[r].lo);
    cb = std::min(cb, seen[r].hi);
  }
  if (ca <= cb) pv_block(P, M, V, ca, cb + 1, DvP, O);
  for (int64_t r = 0; r < M; ++r) {
    const Range& s = seen[r];
    if (s.lo > s.hi) continue;
    const float* prow = P + r * BK;
    float* orow = O + r * DvP;
    if (ca > cb) {
      pv_rows<1>(prow, V, s.lo, s.hi + 1, DvP, orow);
    } else {
      if (s.lo < ca) pv_rows<1>(prow, V, s.lo, ca, DvP, orow);
      if (s.hi > cb) pv_rows<1>(prow, V, cb + 1, s.hi + 1, DvP, orow);
    }
  }
}

struct HybridScratch {
  ScratchVec<float> Qp, Fq, Fqs, S, Oe, Of, m, l, ms, alpha, den, Sf, z, Fk;
  ScratchVec<Range> pre, band, far, seen;
  std::unique_ptr<PackBuffer> K, V;  // the packed tiles of (batch, KV head) `head`: tiles [0, packed)
  int64_t head = -1, packed = 0;
};

// Key tiles [t0, t1) of one (batch, KV head) in fp32: Kt [D][BK] and V [BK][DvP] per tile (keys past Sk zero),
// as the sliding-window tile path packs them.
template <typename T>
inline void hybrid_pack(const T* kh, const T* vh, const HybridArgs& a, int64_t t0, int64_t t1, int64_t DvP, float* K,
                        float* V) {
  const int64_t D = a.dqk, Dv = a.dv, sk = a.sk;
  for (int64_t t = t0; t < t1; ++t) {
    float* Kt = K + t * D * BK;
    float* Vt = V + t * BK * DvP;
    const int64_t j0 = t * BK;
    int64_t jj = 0;
    for (; jj + 16 <= BK && j0 + jj + 16 <= sk; jj += 16) {
      const T* krows[16];
      const T* vrows[16];
      for (int i = 0; i < 16; ++i) {
        krows[i] = kh + (j0 + jj + i) * a.ks.r;
        vrows[i] = vh + (j0 + jj + i) * a.vs.r;
      }
      pack_kv_16(krows, a.ks.d, vrows, a.vs.d, D, Dv, DvP, Kt, Vt, jj);
    }
    for (; jj < BK; ++jj) {
      const int64_t j = j0 + jj;
      if (j < sk)
        pack_kv_row(kh + j * a.ks.r, a.ks.d, vh + j * a.vs.r, a.vs.d, D, Dv, DvP, Kt, Vt, jj);
      else
        zero_kv_row(D, DvP, Kt, Vt, jj);
    }
  }
}

template <typename T>
void hybrid_typed(const HybridArgs& a) {
  constexpr int64_t W = Vec::W;
  const int64_t G = a.hq / a.hkv, D = a.dqk, Dv = a.dv, DvP = round_up(Dv, W);
  const int64_t sq = a.sq, sk = a.sk, ntile = (sk + BK - 1) / BK, heads = a.batch * a.hkv;
  const int64_t prefix = std::min(a.prefix, sk), window = std::min(a.window, sk + sq + 1);
  const int fmap = a.fmap;
  const T* q = typed<T>(a.q);
  const T* k = typed<T>(a.k);
  const T* v = typed<T>(a.v);
  T* out = static_cast<T*>(a.out);

  // Tasks: (batch, KV head, run of blocks). With few heads the blocks are split into runs (each rebuilds the far
  // state up to its first block: O(Sk Dqk Dv), small against the exact part) so that every thread has work. A task
  // packs the key tiles it reads into its worker's buffers, up to each block's last key (the tiles of a head are
  // reused by the worker's next run of that head): one parallel region, no barrier between packing and use.
  const int64_t BQ = std::max<int64_t>(1, kRowsPerBlock / G), nblk = (sq + BQ - 1) / BQ;
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t nrun = heads >= want ? 1 : std::max<int64_t>(1, std::min(nblk, (want + heads - 1) / heads));
  const int64_t MaxM = G * BQ, MaxMP = round_up(MaxM, W), nslice = (D + BK - 1) / BK;
  const auto make_scratch = [&] {
    HybridScratch sc;
    sc.Qp.resize(MaxM * D);
    sc.Fq.resize(MaxM * D);
    sc.Fqs.resize(nslice * MaxM * BK);
    sc.S.resize(MaxM * BK);
    sc.Oe.resize(MaxM * DvP);
    sc.Of.resize(MaxM * DvP);
    sc.m.resize(MaxMP);
    sc.l.resize(MaxMP);
    sc.ms.resize(W);
    sc.alpha.resize(MaxMP);
    sc.den.resize(MaxM);
    sc.Sf.resize(D * DvP);
    sc.z.resize(D);
    sc.Fk.resize(D * BK);
    sc.pre.resize(BQ);
    sc.band.resize(BQ);
    sc.far.resize(BQ);
    sc.seen.resize(MaxM);
    sc.K = std::make_unique<PackBuffer>(ntile * D * BK, 0);
    sc.V = std::make_unique<PackBuffer>(ntile * BK * DvP, 1);
    return sc;
  };
  const auto body = [&](int64_t task, HybridScratch& sc) {
    const int64_t run = task % nrun, bh = task / nrun, b = bh / a.hkv, h = bh % a.hkv;
    const int64_t blk0 = run * nblk / nrun, blk1 = (run + 1) * nblk / nrun;
    const float* Kh = sc.K->get();
    const float* Vh = sc.V->get();
    if (sc.head != bh) {
      sc.head = bh;
      sc.packed = 0;
    }
    float *Qp = sc.Qp.data(), *Fq = sc.Fq.data(), *S = sc.S.data(), *Oe = sc.Oe.data(), *Of = sc.Of.data();
    float *den = sc.den.data(), *Sf = sc.Sf.data(), *z = sc.z.data();
    Range* seen = sc.seen.data();
    std::fill(sc.Sf.begin(), sc.Sf.end(), 0.f);
    std::fill(sc.z.begin(), sc.z.end(), 0.f);
    int64_t state_hi = prefix;  // the state holds the far keys [prefix, state_hi)
    // phi(K) of tile t (its packed Kt as is for identity).
    const auto phi_tile = [&](int64_t t) -> const float* {
      const float* Kt = Kh + t * D * BK;
      if (fmap == kHybridIdentity) return Kt;
      hybrid_phi_n(Kt, D * BK, fmap, sc.Fk.data());
      return sc.Fk.data();
    };

    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * BQ, nq = std::min(BQ, sq - i0), M = G * nq;
      const int64_t p_first = i0 + sk - sq, p_last = p_first + nq - 1;
      const int64_t need = std::min(ntile, std::max<int64_t>(0, p_last / BK + 1));  // every key the block sees
      if (need > sc.packed) {
        hybrid_pack(k + b * a.kb + h * a.ks.h, v + b * a.vb + h * a.vs.h, a, sc.packed, need, DvP, sc.K->get(),
                    sc.V->get());
        sc.packed = need;
      }
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t p = p_first + ii;  // empty ranges: lo > hi (p < 0 sees nothing)
        sc.pre[ii] = Range{0, std::min(prefix, p + 1) - 1};
        sc.band[ii] = window > 0 ? Range{std::max(prefix, p - window + 1), p} : Range{0, -1};
        sc.far[ii] = Range{prefix, std::min(p - window, sk - 1)};
      }
      for (int64_t r = 0; r < M; ++r) {
        sc.m[r] = kNegInf;
        sc.l[r] = 0.f;
        den[r] = 0.f;
      }
      std::fill(Oe, Oe + M * DvP, 0.f);
      std::fill(Of, Of + M * DvP, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t ii = 0; ii < nq; ++ii) {
          const T* src = q + b * a.qb + (h * G + g) * a.qs.h + (i0 + ii) * a.qs.r;
          const int64_t r = g * nq + ii;
          pack_q_row(src, a.qs.d, D, a.scale, Qp + r * D);
          pack_q_row(src, a.qs.d, D, 1.f, Fq + r * D);
          hybrid_phi_n(Fq + r * D, D, fmap, Fq + r * D);
          for (int64_t c = 0; c < nslice; ++c) {
            const int64_t d0 = c * BK, n = std::min(BK, D - d0);
            std::copy(Fq + r * D + d0, Fq + r * D + d0 + n, sc.Fqs.data() + (c * M + r) * BK);
          }
        }

      // Exact keys: each row's range of `ranges`, tile by tile through the online softmax.
      const auto exact = [&](const ScratchVec<Range>& ranges) {
        int64_t lo = INT64_MAX, hi = -1;
        for (int64_t ii = 0; ii < nq; ++ii)
          if (ranges[ii].lo <= ranges[ii].hi) {
            lo = std::min(lo, ranges[ii].lo);
            hi = std::max(hi, ranges[ii].hi);
          }
        if (hi < 0) return;
        for (int64_t t = lo / BK; t <= hi / BK; ++t) {
          const int64_t j0 = t * BK, nk = std::min(BK, sk - j0);
          bool full = nk == BK;
          for (int64_t r = 0; r < M; ++r) {
            const Range& rr = ranges[r % nq];
            seen[r] = Range{std::max(rr.lo, j0) - j0, std::min(rr.hi, j0 + nk - 1) - j0};
            full = full && seen[r].lo == 0 && seen[r].hi == BK - 1;
          }
          qk_block(Qp, M, D, Kh + t * D * BK, S);
          if (!full) {
            for (int64_t r = 0; r < M; ++r) {
              float* srow = S + r * BK;
              const bool none = seen[r].lo > seen[r].hi;  // then the whole row is -inf
              for (int64_t jj = 0; jj < (none ? BK : seen[r].lo); ++jj) srow[jj] = kNegInf;
              for (int64_t jj = none ? BK : seen[r].hi + 1; jj < BK; ++jj) srow[jj] = kNegInf;
            }
          }
          softmax_block(S, M, sc.m.data(), sc.l.data(), Oe, DvP, sc.ms.data(), sc.alpha.data());
          pv_seen(S, M, PackedV{Vh + t * BK * DvP, DvP}, seen, DvP, Oe);
        }
      };
      exact(sc.pre);
      exact(sc.band);

      // Far keys. The state grows by whole tiles whose far keys every row of the block sees (j < p_first -
      // window + 1); phi(Q) S_far and phi(Q).z then serve every row.
      const int64_t all_see = p_first - window + 1, tail_hi = std::min(sk, p_last - window + 1);
      while (state_hi < sk) {
        const int64_t t = state_hi / BK, end = std::min(t * BK + BK, sk);
        if (end > all_see) break;
        const float* Fk = phi_tile(t);
        const int64_t ja = state_hi - t * BK, jb = end - t * BK;
        pv_block(Fk, D, PackedV{Vh + t * BK * DvP, DvP}, ja, jb, DvP, Sf);
        for (int64_t d = 0; d < D; ++d) {
          float s = 0.f;
          for (int64_t j = ja; j < jb; ++j) s += Fk[d * BK + j];
          z[d] += s;
        }
        state_hi = end;
      }
      if (state_hi > prefix) {
        for (int64_t c = 0; c < nslice; ++c)
          pv_block(sc.Fqs.data() + c * M * BK, M, PackedV{Sf + c * BK * DvP, DvP}, 0, std::min(BK, D - c * BK), DvP,
                   Of);
        for (int64_t r = 0; r < M; ++r) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += Fq[r * D + d] * z[d];
          den[r] += s;
        }
      }
      // The far keys past the state up to each row's own bound.
      for (int64_t t = state_hi / BK; state_hi < tail_hi && t <= (tail_hi - 1) / BK; ++t) {
        const int64_t j0 = t * BK, nk = std::min(BK, sk - j0);
        for (int64_t r = 0; r < M; ++r) {
          const Range& rr = sc.far[r % nq];
          seen[r] = Range{std::max(state_hi, j0) - j0, std::min(rr.hi, j0 + nk - 1) - j0};
        }
        qk_block(Fq, M, D, phi_tile(t), S);
        for (int64_t r = 0; r < M; ++r) {
          float s = 0.f;
          for (int64_t jj = seen[r].lo; jj <= seen[r].hi; ++jj) s += S[r * BK + jj];
          den[r] += s;
        }
        pv_seen(S, M, PackedV{Vh + t * BK * DvP, DvP}, seen, DvP, Of);
      }

      for (int64_t g = 0; g < G; ++g)
        for (int64_t ii = 0; ii < nq; ++ii) {
          const int64_t r = g * nq + ii;
          float* oe = Oe + r * DvP;
          const float* of = Of + r * DvP;
          for (int64_t d = 0; d < DvP; d += W) Vec::store(oe + d, Vec::add(Vec::load(oe + d), Vec::load(of + d)));
          const float total = sc.l[r] + den[r];
          if (total == 0.f) std::fill(oe, oe + DvP, 0.f);  // no weight: 0, never 0 x NaN
          store_row(out + b * a.ob + (h * G + g) * a.os.h + (i0 + ii) * a.os.r, a.os.d, oe, Dv,
                    total == 0.f ? 0.f : 1.f / total);
        }
    }
  };
  // A small call runs on the calling thread: waiting at a barrier for a thread that other work holds costs more.
  const int64_t exact_keys = std::min(sk, prefix + window + BK);
  const int64_t macs = heads * G * sq * (exact_keys + 2 * D + BK) * (D + Dv) + heads * sk * D * Dv;
  if (macs < (int64_t{1} << 23)) {
    HybridScratch sc = make_scratch();
    for (int64_t task = 0; task < heads * nrun; ++task) body(task, sc);
  } else {
    parallel_tasks(heads * nrun, 1, make_scratch, body);
  }
}

void hybrid(Tag, const HybridArgs& a) {
  switch (a.dtype) {
    case kFloat32: hybrid_typed<float>(a); break;
    case kBFloat16: hybrid_typed<c10::BFloat16>(a); break;
    case kFloat16: hybrid_typed<c10::Half>(a); break;
  }
}
