// bf16 x times an int4 / int8 weight on oneDNN's brgemm, AMX or AVX512-BF16 (brgemm_dequant.h): the
// dequantization fused into the GEMM.
//
// The dequantized weight is the brgemm's A operand (plain rows, K contiguous: what the packed weight gives
// without a transpose) and x the B operand in the VNNI layout ([K/2][M][2]: x's pairs of K values, a 32-bit
// transpose of x); C = W x^T in fp32, transposed into out with the bias and one rounding.
// Tasks of up to kTaskRows weight rows, taken from a shared counter by one parallel region per call (per
// kMaxCols rows of x): a thread that starts late (the 2 cores are shared) finds fewer tasks left instead of
// holding up the call with a fixed half, and each thread packs its own x^T on its first task (no second
// fork/join for the pack). Per task, per K block, each weight tile is dequantized into a thread-local buffer
// (L1) and multiplied by that K block of x^T for all rows of x at once (add_C accumulates over K blocks into the
// task's C in L2), so each weight is dequantized once per kMaxCols rows of x.
// int4: the 16 values of a (row, group) are looked up as bf16 by VPERMW from a table held twice (32 entries;
// VPERMW reads the low 5 bits of each 16-bit index). The table is bf16((q - z) * s) of the fp32 product: the
// values of the panel path. With group % 128 == 0 (dequant_int4_k4) one 64-byte load of packed codes (128
// values) is four lookups of the same word vector shifted by 0, 4, 8 and 12 bits: word j's low 5 bits are then
// the code of k = 4j, 4j + 1, 4j + 2, 4j + 3 (the bit above the nibble only picks the table's copy). A's K order
// within each 128 values is thus position 32r + j = k 4j + r; the products do not depend on the order of K, so
// x^T is packed in the same order (pack_x_k4). Otherwise (group 32 / 64) one lookup per 32 values in K order:
// the index of a byte's even value is the byte itself, that of its odd value the byte >> 4 (one shift and OR
// of the zero-extended byte), the 32-bit result the pair in K order.
// NaN: a row of x is one column of B and reaches only its column of C, i.e. its own output row; padding columns
// are zeros.
#include "cpu/brgemm_dequant.h"

#include "cpu/aligned_buffer.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace dsattn {
namespace amx {
namespace {
// Weight rows per task (at most; at least kTasksPerThread tasks per thread), per brgemm call (its M), K values
// per block (brgemm's K), and rows of x per pass (brgemm's N, padded to 16). The A tile (kSubRows x kKB bf16, or
// twice the rows at half the K for up to kNarrowCols rows of x) is 32 KiB and stays in L1; the task's fp32 C
// (512 x 256: 512 KiB) and x^T's K block (512 x 256 bf16: 256 KiB) stay in L2. Measured (4096 x 4096): with 16
// rows of x the 64 x 256 tile beats 32 x 256 (the brgemm's C is one tile column there, so more rows per call
// amortize its fixed cost), from 64 rows 32 x 512 beats 32 x 256; 64-KiB tiles are slower. 512-row tasks pass
// x^T's K blocks through L2 half as often as 256-row ones (faster at 256 and 1024 rows of x, the same at 16);
// more rows of x per pass measured no better (kMaxCols 512) or slower (1024: C and x^T overflow L2).
constexpr int64_t kTaskRows = 512;
constexpr int64_t kTasksPerThread = 2;
constexpr int64_t kSubRows = 32;
constexpr int64_t kKB = 512;
constexpr int64_t kNarrowCols = 32;
constexpr int64_t kMaxCols = 256;
}  // namespace
}  // namespace amx
}  // namespace dsattn

#if defined(__x86_64__) && defined(__GNUC__) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#include <immintrin.h>

#include "cpu/isa_target.h"

namespace dsattn {
namespace amx {
namespace {
// Without AMX, torch runs the VNNI-layout bf16 brgemm where oneDNN's ISA is at least avx512_core and raises
// otherwise (e.g. a lower ONEDNN_MAX_CPU_ISA); oneDNN's ISA is not exported, so one small call tells.
bool brgemm_runs() {
  try {
    std::vector<at::BFloat16> a(16 * 32), b(32 * 16);
    std::vector<float> c(16 * 16);
    at::native::cpublas::brgemm(16, 16, 32, 32, 16, 16, false, a.data(), b.data(), c.data(), /*is_vnni=*/true);
    at::native::cpublas::brgemm_release(true);
    return true;
  } catch (const c10::Error&) {
    return false;
  }
}
}  // namespace

// Outside the AVX-512 region: runs on any CPU.
Kind available(const char* env) {
  const char* v = std::getenv(env);
  if (v != nullptr && std::strcmp(v, "0") == 0) return Kind::kNone;
  // Checked per call: torch.backends.mkldnn can be switched off at any time, and brgemm then raises.
  if (!at::globalContext().userEnabledMkldnn()) return Kind::kNone;
  static const Kind kind = !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"))
                               ? Kind::kNone
                           : at::native::cpublas::could_pack(at::kBFloat16) ? Kind::kAmx
                           : brgemm_runs()                                  ? Kind::kAvx512Bf16
                                                                            : Kind::kNone;
  return kind;
}
}  // namespace amx
}  // namespace dsattn

DSATTN_TARGET_PUSH("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,avx2")

#include "cpu/transpose16x16.h"

namespace dsattn {
namespace amx {

namespace {
// 2 x 16 fp32 -> 32 bf16 bits in order (lo, hi), nearest even (VCVTNE2PS2BF16).
inline __m512i to_bf16(__m512 lo, __m512 hi) { return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)); }

// The tile after this one (gemm's next call: the next `rows` weight rows, same K range) is requested while
// this one is dequantized and multiplied: each row's K block is only a few cache lines, too short for the
// hardware prefetcher, so the weight stream was latency-bound. (A prefetch past the weight's end is harmless.)
inline void prefetch_next(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T1);
}

// The int4 dequant walk: per weight row and group, the group's 16 values as a bf16 table held twice, then
// body(table, packed codes, out) for each kStep values of the group.
template <int64_t kStep, typename Body>
inline void dequant_int4_rows(const Int4Weight& w, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst,
                              Body body) {
  const int64_t groups = w.k / w.group, row_bytes = w.k / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    const uint8_t* qr = w.q + row * row_bytes;
    uint16_t* d = dst + r * len;
    prefetch_next(qr + rows * row_bytes + k0 / 2, len / 2);
    for (int64_t g0 = k0; g0 < k0 + len;) {
      const int64_t g = g0 / w.group, g1 = std::min((g + 1) * w.group, k0 + len);
      const __m512 zero = _mm512_set1_ps(static_cast<float>(w.z[row * groups + g]));
      const __m512 vals = _mm512_mul_ps(_mm512_sub_ps(iota, zero), _mm512_set1_ps(w.s[row * groups + g]));
      const __m512i table = to_bf16(vals, vals);
      for (int64_t kk = g0; kk < g1; kk += kStep) body(table, qr + kk / 2, d + (kk - k0));
      g0 = g1;
    }
  }
}
}  // namespace

void dequant_int4(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst) {
  dequant_int4_rows<32>(*static_cast<const Int4Weight*>(weight), n0, rows, k0, len, dst,
                        [](__m512i table, const uint8_t* q, uint16_t* o) {
                          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
                          const __m512i idx = _mm512_or_si512(v, _mm512_slli_epi32(v, 12));
                          _mm512_storeu_si512(o, _mm512_permutexvar_epi16(idx, table));
                        });
}

void dequant_int4_k4(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst) {
  dequant_int4_rows<128>(*static_cast<const Int4Weight*>(weight), n0, rows, k0, len, dst,
                         [](__m512i table, const uint8_t* q, uint16_t* o) {
                           const __m512i v = _mm512_loadu_si512(q);
                           _mm512_storeu_si512(o, _mm512_permutexvar_epi16(v, table));
                           _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
                           _mm512_storeu_si512(o + 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table));
                           _mm512_storeu_si512(o + 96, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table));
                         });
}

void dequant_int8(const void* weight, int64_t n0, int64_t rows, int64_t k0, int64_t len, uint16_t* dst) {
  const Int8Weight& w = *static_cast<const Int8Weight*>(weight);
  const int64_t groups = w.group > 0 ? w.k / w.group : 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = n0 + r;
    const int8_t* qr = w.q + row * w.k;
    const float* sr = w.s + row * groups;
    uint16_t* d = dst + r * len;
    prefetch_next(qr + rows * w.k + k0, len);
    for (int64_t kk = k0; kk < k0 + len; kk += 32) {  // group % 16 == 0: two scales per 32 values at most
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + kk));
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))),
                                      _mm512_set1_ps(sr[w.group > 0 ? kk / w.group : 0]));
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))),
                                      _mm512_set1_ps(sr[w.group > 0 ? (kk + 16) / w.group : 0]));
      _mm512_storeu_si512(d + (kk - k0), to_bf16(lo, hi));
    }
  }
}

namespace {
// x rows [m0, m0 + rows) as brgemm's VNNI B: xt[(k / 2) * cols + c] = 32-bit pair (x[m0 + c, k], x[.., k + 1]),
// columns rows..cols zero. 16 x 16 tiles of pairs (16 rows of x by one cache line each).
void pack_x(const uint16_t* x, int64_t ldx, int64_t m0, int64_t rows, int64_t cols, int64_t k, uint32_t* xt) {
  for (int64_t b = 0; b < k / 32; ++b) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = c0 + i < rows ? _mm512_loadu_si512(x + (m0 + c0 + i) * ldx + 32 * b) : _mm512_setzero_si512();
      transpose16x16(v);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xt + (16 * b + i) * cols + c0, v[i]);
    }
  }
}

// pack_x in dequant_int4_k4's K order: within each 128 values, position 32r + j holds x[.., 4j + r]. Row vector
// r is x's words 4j + r of the first 64 values (j < 16, VPERMT2W on two cache lines) and of the last 64 (j >= 16,
// the same index on the next two), merged by a blend; then the 16 x 16 transposes of pack_x.
void pack_x_k4(const uint16_t* x, int64_t ldx, int64_t m0, int64_t rows, int64_t cols, int64_t k, uint32_t* xt) {
  __m512i idx[4];
  for (int r = 0; r < 4; ++r) {
    alignas(64) uint16_t t[32];
    for (int j = 0; j < 32; ++j) t[j] = static_cast<uint16_t>(4 * (j % 16) + r);
    idx[r] = _mm512_load_si512(t);
  }
  for (int64_t c = 0; c < k / 128; ++c) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      for (int r = 0; r < 4; ++r) {
        __m512i v[16];
        for (int i = 0; i < 16; ++i) {
          if (c0 + i < rows) {
            const uint16_t* xr = x + (m0 + c0 + i) * ldx + 128 * c;
            const __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx[r], _mm512_loadu_si512(xr + 32));
            const __m512i hi =
                _mm512_permutex2var_epi16(_mm512_loadu_si512(xr + 64), idx[r], _mm512_loadu_si512(xr + 96));
            v[i] = _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi);
          } else {
            v[i] = _mm512_setzero_si512();
          }
        }
        transpose16x16(v);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xt + (64 * c + 16 * r + i) * cols + c0, v[i]);
      }
    }
  }
}

// out rows [m0, m0 + rows_x), columns [n0, n0 + rows) = bf16(C^T + bias): 16 x 16 tiles of C (fp32, [rows,
// cols]) transposed, rounded by VCVTNEPS2BF16 (nearest even, NaN kept).
void store_out(const float* acc, int64_t cols, int64_t rows, int64_t rows_x, const float* bias, int64_t m0,
               int64_t n0, int64_t n, uint16_t* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    const __mmask16 rmask = static_cast<__mmask16>((1u << nr) - 1);
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(rmask, bias + n0 + r0) : _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < rows_x; c0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = i < nr ? _mm512_loadu_si512(acc + (r0 + i) * cols + c0) : _mm512_setzero_si512();
      transpose16x16(v);
      for (int i = 0; i < 16 && c0 + i < rows_x; ++i) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(v[i]), b));
        _mm256_mask_storeu_epi16(out + (m0 + c0 + i) * n + n0 + r0, rmask, reinterpret_cast<const __m256i&>(h));
      }
    }
  }
}

// Per-thread scratch reused across calls (no page faults per call).
struct Scratch {
  AlignedBuffer<uint16_t> a;
  AlignedBuffer<float> c;
  AlignedBuffer<uint32_t> xt;
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}
}  // namespace

void gemm(const uint16_t* x, int64_t ldx, int64_t m, int64_t n, int64_t k, DequantFn dequant, bool k4,
          const void* weight, const float* bias, uint16_t* out) {
  const bool narrow = std::min(m, kMaxCols) <= kNarrowCols;
  const int64_t sub = narrow ? 2 * kSubRows : kSubRows, kb = std::min(narrow ? kKB / 2 : kKB, k);
  // Task rows: at most kTaskRows, whole sub-blocks (the tiling, hence every result, is the same for any thread
  // count), at least kTasksPerThread tasks per thread (torch.get_num_threads()).
  const int64_t threads = at::get_num_threads();
  const int64_t per_task = (n + threads * kTasksPerThread - 1) / (threads * kTasksPerThread);
  const int64_t tn = std::max<int64_t>(sub, std::min(kTaskRows, (per_task + sub - 1) / sub * sub));
  const int64_t tasks = (n + tn - 1) / tn;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxCols) {
    const int64_t rows_x = std::min(kMaxCols, m - m0), cols = (rows_x + 15) / 16 * 16;
    std::atomic<int64_t> next{0};
    // One invocation per thread (or one for all where already inside a parallel region); tasks by the counter.
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Scratch& s = scratch();
      bool packed = false;
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        if (!packed) {
          s.a.reserve(sub * kb);
          s.c.reserve(tn * cols);
          s.xt.reserve(cols * k / 2);
          (k4 ? pack_x_k4 : pack_x)(x, ldx, m0, rows_x, cols, k, s.xt.data());
          packed = true;
        }
        const auto* xtb = reinterpret_cast<const at::BFloat16*>(s.xt.data());
        const int64_t n0 = t * tn, rows = std::min(tn, n - n0);
        // x^T's K block stays in L2 while every sub-block of the task's weight rows passes over it.
        for (int64_t k0 = 0; k0 < k; k0 += kb) {
          const int64_t len = std::min(kb, k - k0);
          for (int64_t j0 = 0; j0 < rows; j0 += sub) {
            const int64_t jr = std::min(sub, rows - j0);
            dequant(weight, n0 + j0, jr, k0, len, s.a.data());
            at::native::cpublas::brgemm(jr, cols, len, len, cols, cols, k0 > 0,
                                        reinterpret_cast<const at::BFloat16*>(s.a.data()), xtb + k0 * cols,
                                        s.c.data() + j0 * cols, /*is_vnni=*/true);
          }
        }
        store_out(s.c.data(), cols, rows, rows_x, bias, m0, n0, n, out);
      }
      if (packed) at::native::cpublas::brgemm_release(true);
    });
  }
}

}  // namespace amx
}  // namespace dsattn

DSATTN_TARGET_POP()

#else  // no AMX brgemm in this torch / not x86-64: never selected

namespace dsattn {
namespace amx {
Kind available(const char*) { return Kind::kNone; }
void dequant_int4(const void*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void dequant_int4_k4(const void*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void dequant_int8(const void*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void gemm(const uint16_t*, int64_t, int64_t, int64_t, int64_t, DequantFn, bool, const void*, const float*,
          uint16_t*) {}
}  // namespace amx
}  // namespace dsattn

#endif
