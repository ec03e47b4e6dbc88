// Per-row radix top-k of the CPU topk_select (csrc/cpu/topk_select.cpp, algorithm described there), shared with
// the fused CPU lightning indexer (csrc/cpu/lightning_indexer_topk.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace dsattn {
namespace topk_cpu {

inline uint32_t score_key(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  if (s != s) return 0u;  // NaN
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Scratch of one worker: the row's keys, the candidates left after the top digit, the picked (key, index) pairs
// and the sort's ping-pong buffer.
struct Scratch {
  std::vector<uint32_t> keys;
  std::vector<int32_t> cand;
  std::vector<uint64_t> picked, tmp;
};

// The picked entries as ((~key) << 32 | index): ascending order is (key descending, index ascending). LSD radix
// sort by the 4 key bytes (a stable pass per byte; passes whose byte is the same for all entries are skipped);
// the entries come in index order, so stability keeps ties by index.
inline void sort_picked(std::vector<uint64_t>& a, std::vector<uint64_t>& tmp) {
  const size_t m = a.size();
  tmp.resize(m);
  for (int shift = 32; shift < 64; shift += 8) {
    size_t count[257] = {0};
    for (size_t i = 0; i < m; ++i) ++count[((a[i] >> shift) & 0xFFu) + 1];
    if (count[((a[0] >> shift) & 0xFFu) + 1] == m) continue;
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (size_t i = 0; i < m; ++i) tmp[count[(a[i] >> shift) & 0xFFu]++] = a[i];
    a.swap(tmp);
  }
}

inline void select_row(const float* row, int64_t n, int64_t k, int32_t* out, Scratch& sc) {
  auto& keys = sc.keys;
  keys.resize(n);
  for (int64_t j = 0; j < n; ++j) keys[j] = score_key(row[j]);
  uint32_t thr = 0;
  int64_t take_eq = n;  // n <= k: thr 0 takes every key (all keys >= 0)
  if (n > k) {
    // Top digit over every key; the later digits only over the candidates that share it (few, usually).
    int64_t hist[256] = {0};
    for (int64_t j = 0; j < n; ++j) ++hist[keys[j] >> 24];
    int64_t remaining = k;  // how many of the keys matching `prefix` still belong to the top k
    int digit = 255;
    for (; digit > 0 && hist[digit] < remaining; --digit) remaining -= hist[digit];
    uint32_t prefix = static_cast<uint32_t>(digit) << 24;
    auto& cand = sc.cand;
    cand.clear();
    for (int64_t j = 0; j < n; ++j)
      if ((keys[j] >> 24) == static_cast<uint32_t>(digit)) cand.push_back(static_cast<int32_t>(j));
    uint32_t mask = 0xFF000000u;
    for (int shift = 16; shift >= 0; shift -= 8) {
      int64_t h2[256] = {0};
      for (const int32_t j : cand)
        if ((keys[j] & mask) == prefix) ++h2[(keys[j] >> shift) & 0xFFu];
      int d = 255;
      for (; d > 0 && h2[d] < remaining; --d) remaining -= h2[d];
      prefix |= static_cast<uint32_t>(d) << shift;
      mask |= 0xFFu << shift;
    }
    thr = prefix;
    take_eq = remaining;
  }
  auto& picked = sc.picked;
  picked.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (keys[j] > thr || (keys[j] == thr && take_eq-- > 0))
      picked.push_back(static_cast<uint64_t>(~keys[j]) << 32 | static_cast<uint32_t>(j));
  }
  if (!picked.empty()) sort_picked(picked, sc.tmp);
  const int64_t m = static_cast<int64_t>(picked.size());
  for (int64_t i = 0; i < m; ++i) out[i] = static_cast<int32_t>(picked[i] & 0xFFFFFFFFu);
  for (int64_t i = m; i < k; ++i) out[i] = -1;
}

}  // namespace topk_cpu
}  // namespace dsattn
