// The linear attention kernel (csrc/cpu/linear_attention.cpp), written once over a vector type `Vec` and
// included by that file once per ISA, each time inside its own namespace (and, for AVX-512, its own
// `#pragma GCC target`). No include guard on purpose: it is meant to be included several times.
//
// Per (batch, q head) task, everything in fp32: the state S [Dk][Dvp] and z [Dk] stay in the task's buffers
// (L1/L2), the keys and values of one chunk of C rows are feature-mapped and converted once (K transposed,
// [Dk][Cp], so that each q element is broadcast against vectors of keys), and per chunk
//   A = tril(phi(Q) phi(K)^T)                 (only the columns a row block can see are computed)
//   O = phi(Q) S + A V,  den = phi(Q) . z + rowsum(A)   (A V of the diagonal block per row over j <= i only)
//   S += phi(K)^T V,     z += colsum(phi(K))
// Keys no query reads through the causal mask only feed the state. Keys after a row's position never enter its
// arithmetic: their scores are overwritten (not multiplied) and their values are never read for it.
// Row dims padded to Vec::W: Cp (keys per chunk), Dvp (value dims); the padding is never written out.

constexpr int64_t kChunk = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// phi on n fp32 values in place (feature map codes of linear_attention.cpp).
inline void feature_map(float* x, int64_t n, int fmap) {
  if (fmap == kIdentity) return;
  int64_t i = 0;
  for (; i + Vec::W <= n; i += Vec::W) {
    const typename Vec::reg v = Vec::load(x + i);
    Vec::store(x + i, fmap == kRelu ? Vec::max0(v) : Vec::elu1(v));
  }
  for (; i < n; ++i) x[i] = fmap == kRelu ? scalar_relu(x[i]) : scalar_elu1(x[i]);
}

// rows [0, n) of a [*, d] strided source -> dst [n][ld] fp32 (the first d of each row).
template <typename T>
inline void load_rows(const T* src, int64_t rs, int64_t ds, int64_t n, int64_t d, float* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * rs;
    float* o = dst + r * ld;
    if (ds == 1) {
      for (int64_t e = 0; e < d; ++e) o[e] = static_cast<float>(s[e]);
    } else {
      for (int64_t e = 0; e < d; ++e) o[e] = static_cast<float>(s[e * ds]);
    }
  }
}

// C[MR rows][NV vectors] (+)= A[MR][T] (row stride lda) . B[T][NV * W] (row stride ldb).
template <int MR, int NV>
inline void tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t T,
                 bool accumulate) {
  typename Vec::reg acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = accumulate ? Vec::load(C + r * ldc + c * Vec::W) : Vec::zero();
  for (int64_t t = 0; t < T; ++t) {
    typename Vec::reg b[NV];
    for (int c = 0; c < NV; ++c) b[c] = Vec::load(B + t * ldb + c * Vec::W);
    for (int r = 0; r < MR; ++r) {
      const typename Vec::reg a = Vec::set1(A[r * lda + t]);
      for (int c = 0; c < NV; ++c) acc[r][c] = Vec::fma(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) Vec::store(C + r * ldc + c * Vec::W, acc[r][c]);
}

template <int MR>
inline void tile_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t T,
                      int64_t N, bool accumulate) {
  int64_t n0 = 0;
  for (; n0 + 4 * Vec::W <= N; n0 += 4 * Vec::W) tile<MR, 4>(A, lda, B + n0, ldb, C + n0, ldc, T, accumulate);
  switch ((N - n0) / Vec::W) {
    case 3: tile<MR, 3>(A, lda, B + n0, ldb, C + n0, ldc, T, accumulate); break;
    case 2: tile<MR, 2>(A, lda, B + n0, ldb, C + n0, ldc, T, accumulate); break;
    case 1: tile<MR, 1>(A, lda, B + n0, ldb, C + n0, ldc, T, accumulate); break;
    default: break;
  }
}

// C[M][N] (+)= A[M][T] . B[T][N], N a multiple of W; Vec::MR rows per register tile (up to 6).
inline void gemm(int64_t M, int64_t N, int64_t T, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + Vec::MR <= M; m += Vec::MR)
    tile_rows<Vec::MR>(A + m * lda, lda, B, ldb, C + m * ldc, ldc, T, N, accumulate);
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 5: tile_rows<5>(a, lda, B, ldb, c, ldc, T, N, accumulate); break;
    case 4: tile_rows<4>(a, lda, B, ldb, c, ldc, T, N, accumulate); break;
    case 3: tile_rows<3>(a, lda, B, ldb, c, ldc, T, N, accumulate); break;
    case 2: tile_rows<2>(a, lda, B, ldb, c, ldc, T, N, accumulate); break;
    case 1: tile_rows<1>(a, lda, B, ldb, c, ldc, T, N, accumulate); break;
    default: break;
  }
}

struct Buffers {
  ScratchVec<float> q, k, kt, v, a, o, s, z, den;
  Buffers(int64_t dk, int64_t dvp, int64_t cp)
      : q(kChunk * dk), k(kChunk * dk), kt(dk * cp), v(kChunk * dvp), a(kChunk * cp), o(kChunk * dvp), s(dk * dvp),
        z(dk), den(kChunk) {}
};

template <typename T>
struct Task {
  const LinArgs& a;
  Buffers& w;
  int64_t dvp, cp;

  // The chunk's keys [k0, k0 + n) of kv head (b, h): phi(K)^T into w.kt, V into w.v.
  void load_kv(const T* kb, const T* vb, int64_t k0, int64_t n) {
    const int64_t dk = a.dk;
    load_rows(kb + k0 * a.ks.r, a.ks.r, a.ks.d, n, dk, w.k.data(), dk);
    for (int64_t j = 0; j < n; ++j) feature_map(w.k.data() + j * dk, dk, a.fmap);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < dk; ++d) w.kt[d * cp + j] = w.k[j * dk + d];
    for (int64_t d = 0; d < dk; ++d)
      for (int64_t j = n; j < cp; ++j) w.kt[d * cp + j] = 0.f;
    load_rows(vb + k0 * a.vs.r, a.vs.r, a.vs.d, n, a.dv, w.v.data(), dvp);
  }

  // S += phi(K)^T V, z += colsum phi(K) over the n loaded keys.
  void absorb(int64_t n) {
    gemm(a.dk, dvp, n, w.kt.data(), cp, w.v.data(), dvp, w.s.data(), dvp, true);
    for (int64_t d = 0; d < a.dk; ++d) {
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += w.kt[d * cp + j];
      w.z[d] += sum;
    }
  }

  void load_q(const T* qb, int64_t q0, int64_t n) {
    load_rows(qb + q0 * a.qs.r, a.qs.r, a.qs.d, n, a.dk, w.q.data(), a.dk);
    for (int64_t i = 0; i < n; ++i) feature_map(w.q.data() + i * a.dk, a.dk, a.fmap);
  }

  // O = phi(Q) S, den = phi(Q) . z for the n loaded rows.
  void apply_state(int64_t n) {
    gemm(n, dvp, a.dk, w.q.data(), a.dk, w.s.data(), dvp, w.o.data(), dvp, false);
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0.f;
      for (int64_t d = 0; d < a.dk; ++d) sum += w.q[i * a.dk + d] * w.z[d];
      w.den[i] = sum;
    }
  }

  // Adds the chunk's own keys (row i sees keys j <= i) to O and den.
  void causal_block(int64_t n) {
    float* A = w.a.data();
    for (int64_t i0 = 0; i0 < n; i0 += Vec::MR) {
      const int64_t mr = std::min<int64_t>(Vec::MR, n - i0);
      const int64_t cols = std::min(cp, round_up(i0 + mr, Vec::W));
      gemm(mr, cols, a.dk, w.q.data() + i0 * a.dk, a.dk, w.kt.data(), cp, A + i0 * cp, cp, false);
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t i = i0 + r;
        float sum = 0.f;
        for (int64_t j = 0; j <= i; ++j) sum += A[i * cp + j];
        for (int64_t j = i + 1; j < cols; ++j) A[i * cp + j] = 0.f;  // overwritten: a NaN there stays out
        w.den[i] += sum;
      }
      // Keys before the block: seen by all its rows; the block's own keys per row, j <= i only.
      if (i0 > 0) gemm(mr, dvp, i0, A + i0 * cp, cp, w.v.data(), dvp, w.o.data() + i0 * dvp, dvp, true);
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t i = i0 + r;
        gemm(1, dvp, r + 1, A + i * cp + i0, cp, w.v.data() + i0 * dvp, dvp, w.o.data() + i * dvp, dvp, true);
      }
    }
  }

  void store_out(T* ob, int64_t q0, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const float* o = w.o.data() + i * dvp;
      T* dst = ob + (q0 + i) * a.os.r;
      if (a.normalize) {
        const float den = w.den[i] + a.eps;  // a division, as the other backends round it
        for (int64_t e = 0; e < a.dv; ++e) dst[e * a.os.d] = static_cast<T>(o[e] / den);
      } else {
        for (int64_t e = 0; e < a.dv; ++e) dst[e * a.os.d] = static_cast<T>(o[e]);
      }
    }
  }

  // Where task (b, h) reads and writes: q head h, its kv head (GQA), its output, and its index into the
  // [B, Hq, ...] state tensors.
  struct Heads {
    const T *q, *k, *v;
    T* o;
    int64_t task;
  };
  Heads heads(int64_t b, int64_t h) const {
    const int64_t hk = h / (a.hq / a.hkv);
    return Heads{static_cast<const T*>(a.q) + b * a.qb + h * a.qs.h,
                 static_cast<const T*>(a.k) + b * a.kb + hk * a.ks.h,
                 static_cast<const T*>(a.v) + b * a.vb + hk * a.vs.h, static_cast<T*>(a.out) + b * a.ob + h * a.os.h,
                 b * a.hq + h};
  }

  void run(int64_t b, int64_t h) {
    const Heads p = heads(b, h);
    const int64_t dk = a.dk, dv = a.dv, task = p.task;
    for (int64_t d = 0; d < dk; ++d) {
      float* s = w.s.data() + d * dvp;
      if (a.S0 != nullptr) {
        std::copy(a.S0 + (task * dk + d) * dv, a.S0 + (task * dk + d + 1) * dv, s);
      } else {
        std::fill(s, s + dv, 0.f);
      }
      std::fill(s + dv, s + dvp, 0.f);
      w.z[d] = a.z0 != nullptr ? a.z0[task * dk + d] : 0.f;
    }
    const int64_t absorbed = a.causal ? a.sk - a.sq : a.sk;
    for (int64_t k0 = 0; k0 < absorbed; k0 += kChunk) {
      const int64_t n = std::min(kChunk, absorbed - k0);
      load_kv(p.k, p.v, k0, n);
      absorb(n);
    }
    for (int64_t q0 = 0; q0 < a.sq; q0 += kChunk) {
      const int64_t n = std::min(kChunk, a.sq - q0);
      load_q(p.q, q0, n);
      apply_state(n);
      if (a.causal) {
        load_kv(p.k, p.v, absorbed + q0, n);
        causal_block(n);
        absorb(n);
      }
      store_out(p.o, q0, n);
    }
    for (int64_t d = 0; d < dk; ++d) {
      std::copy(w.s.data() + d * dvp, w.s.data() + d * dvp + dv, a.S + (task * dk + d) * dv);
      a.z[task * dk + d] = w.z[d];
    }
  }

  // One key and one query (decode on a carried state): S' = S0 + phi(k) v^T and o = phi(q) S' in one pass
  // over the state, z' = z0 + phi(k).
  void decode(int64_t b, int64_t h) {
    const Heads p = heads(b, h);
    const int64_t dk = a.dk, dv = a.dv, task = p.task;
    load_rows(p.q, 0, a.qs.d, 1, dk, w.q.data(), dk);
    load_rows(p.k, 0, a.ks.d, 1, dk, w.k.data(), dk);
    load_rows(p.v, 0, a.vs.d, 1, dv, w.v.data(), dvp);
    feature_map(w.q.data(), dk, a.fmap);
    feature_map(w.k.data(), dk, a.fmap);
    const float* fq = w.q.data();
    const float* fk = w.k.data();
    const float* vv = w.v.data();
    const float* s0 = a.S0 == nullptr ? nullptr : a.S0 + task * dk * dv;
    float* s1 = a.S + task * dk * dv;
    float* o = w.o.data();
    const int64_t dv_vec = dv / Vec::W * Vec::W;
    for (int64_t c0 = 0; c0 < dv_vec; c0 += 4 * Vec::W) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (dv_vec - c0) / Vec::W));
      typename Vec::reg acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
      typename Vec::reg vr[4];
      for (int c = 0; c < nv; ++c) vr[c] = Vec::load(vv + c0 + c * Vec::W);
      for (int64_t d = 0; d < dk; ++d) {
        const typename Vec::reg kd = Vec::set1(fk[d]), qd = Vec::set1(fq[d]);
        for (int c = 0; c < nv; ++c) {
          const int64_t off = d * dv + c0 + c * Vec::W;
          const typename Vec::reg s = s0 == nullptr ? Vec::mul(kd, vr[c]) : Vec::fma(kd, vr[c], Vec::load(s0 + off));
          Vec::store(s1 + off, s);
          acc[c] = Vec::fma(qd, s, acc[c]);
        }
      }
      for (int c = 0; c < nv; ++c) Vec::store(o + c0 + c * Vec::W, acc[c]);
    }
    for (int64_t e = dv_vec; e < dv; ++e) {
      float acc = 0.f;
      for (int64_t d = 0; d < dk; ++d) {
        const float s = s0 == nullptr ? fk[d] * vv[e] : fk[d] * vv[e] + s0[d * dv + e];
        s1[d * dv + e] = s;
        acc += fq[d] * s;
      }
      o[e] = acc;
    }
    float den = 0.f;
    for (int64_t d = 0; d < dk; ++d) {
      const float zd = (a.z0 == nullptr ? 0.f : a.z0[task * dk + d]) + fk[d];
      a.z[task * dk + d] = zd;
      den += fq[d] * zd;
    }
    w.den[0] = den;
    store_out(p.o, 0, 1);
  }
};

template <typename T>
void run_typed(const LinArgs& a) {
  const int64_t dvp = round_up(a.dv, Vec::W), cp = round_up(kChunk, Vec::W);
  const bool one_step = a.sq == 1 && a.sk == 1;
  // Tasks per thread: at least ~2^22 multiply-adds (a millisecond or two) each, so that a small call (a decode
  // step of up to ~128 heads of 128 x 128) runs on the calling thread instead of waiting at a barrier for a
  // thread that other work holds (10+ ms on a loaded machine, for a step that takes 0.3 ms on one core).
  const int64_t cost = a.dk * a.dv * (a.sq + a.sk) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / cost);
  at::parallel_for(0, a.batch * a.hq, grain, [&](int64_t begin, int64_t end) {
    Buffers w(a.dk, dvp, cp);
    Task<T> t{a, w, dvp, cp};
    for (int64_t u = begin; u < end; ++u) {
      if (one_step) {
        t.decode(u / a.hq, u % a.hq);
      } else {
        t.run(u / a.hq, u % a.hq);
      }
    }
  });
}

void linear_attention(Tag, const LinArgs& a) {
  switch (a.dtype) {
    case cpu_attn::kBFloat16: run_typed<c10::BFloat16>(a); break;
    case cpu_attn::kFloat16: run_typed<c10::Half>(a); break;
    default: run_typed<float>(a); break;
  }
}
