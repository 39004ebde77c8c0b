// Dedupe for the CPU fused backward: a stable, parallel LSD radix sort of the ids by entry.
//
// Sorting (rather than hashing) makes the per-entry pass walk chunk_slots and utilities
// in ascending order, keeps each entry's ids in their original order (the reference's
// summation order) and is deterministic. FBGEMM's CPU TBE backward sorts too.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fiited_cpu_utils.h"

namespace fiited {

// Radix digits of at most 11 bits keep the histogram (2048 x 8 B per task) in L1; E = 200k
// entries then takes two passes.
constexpr int kMaxRadixBits = 11;
constexpr int kMaxSinglePassBits = 16;

// Buffers of the sort, kept per calling thread and reused across calls: first-touch of fresh
// memory costs more than the sort itself (fiited_cpu.cpp, file comment).
struct SortWorkspace {
  std::vector<uint32_t> keys[2];       // (n) entries
  std::vector<int32_t> ids[2];         // (n) id of each key
  std::vector<int64_t> histogram;      // (tasks, 2^bits)
  std::vector<int32_t> segment_starts; // (U + 1) first sorted position of each unique entry
};

inline SortWorkspace& sort_workspace(int64_t n) {
  thread_local SortWorkspace ws;
  for (int b = 0; b < 2; ++b) {
    if (static_cast<int64_t>(ws.keys[b].size()) < n) {
      ws.keys[b].resize(n);
      ws.ids[b].resize(n);
    }
  }
  return ws;
}

// One stable counting pass on digit (key >> shift) & mask, from (src_keys, src_ids) into (dst_*).
// src_keys == nullptr reads the keys from entries (a skipped id, entry < 0, as `skip_key`) and
// takes ids 0..n-1.
inline void radix_pass(
    const int64_t* entries,    // (n) the keys of the first pass
    uint32_t skip_key,
    const uint32_t* src_keys,  // (n) or nullptr
    const int32_t* src_ids,    // (n) or nullptr
    uint32_t* dst_keys,        // (n)
    int32_t* dst_ids,          // (n)
    int64_t n,
    int shift,
    int bits,
    std::vector<int64_t>& histogram) {
  const int64_t buckets = int64_t{1} << bits, mask = buckets - 1;
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinWorkPerTask));
  histogram.assign(tasks * buckets, 0);
  auto key = [&](int64_t i) {
    return src_keys ? src_keys[i] : entries[i] < 0 ? skip_key : static_cast<uint32_t>(entries[i]);
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = histogram.data() + t * buckets;
      // Bounds in locals: written in the loop condition, the division was redone per key (the
      // stores through h may alias n and tasks), 86% of the sort's time.
      const int64_t begin = n * t / tasks, end = n * (t + 1) / tasks;
      for (int64_t i = begin; i < end; ++i) ++h[(key(i) >> shift) & mask];
    }
  });
  int64_t running = 0;  // exclusive scan, bucket-major then task: keeps the sort stable
  for (int64_t d = 0; d < buckets; ++d) {
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t count = histogram[t * buckets + d];
      histogram[t * buckets + d] = running;
      running += count;
    }
  }
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* h = histogram.data() + t * buckets;
      const int64_t begin = n * t / tasks, end = n * (t + 1) / tasks;
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t k = key(i);
        const int64_t pos = h[(k >> shift) & mask]++;
        dst_keys[pos] = k;
        dst_ids[pos] = src_ids ? src_ids[i] : static_cast<int32_t>(i);
      }
    }
  });
}

// Sorts the ids by entry; returns the buffer index holding the result and fills segment_starts
// with the segments of entries >= 0. Skipped ids (entry < 0) sort last, as entry num_entries,
// and belong to no segment.
inline int sort_by_entry(
    SortWorkspace& ws, const int64_t* entries, int64_t n, int64_t num_entries) {
  const uint32_t skip_key = static_cast<uint32_t>(num_entries);
  int key_bits = 1;
  while (key_bits < 32 && (int64_t{1} << key_bits) < num_entries + 1) ++key_bits;
  // One pass over a wider digit when the histogram's scan costs less than the second pass
  // over the ids it saves.
  const int passes = key_bits <= kMaxSinglePassBits && (int64_t{1} << key_bits) <= n
      ? 1 : (key_bits + kMaxRadixBits - 1) / kMaxRadixBits;
  const int bits = (key_bits + passes - 1) / passes;
  int src = 0;
  for (int p = 0; p < passes; ++p, src ^= 1) {
    const bool first = p == 0;
    radix_pass(
        entries, skip_key, first ? nullptr : ws.keys[src].data(), first ? nullptr : ws.ids[src].data(),
        ws.keys[src ^ 1].data(), ws.ids[src ^ 1].data(), n, p * bits, bits, ws.histogram);
  }
  const uint32_t* keys = ws.keys[src].data();
  ws.segment_starts.clear();
  int64_t j = 0;
  for (; j < n && keys[j] != skip_key; ++j) {
    if (j == 0 || keys[j] != keys[j - 1]) ws.segment_starts.push_back(static_cast<int32_t>(j));
  }
  ws.segment_starts.push_back(static_cast<int32_t>(j));
  return src;
}

}  // namespace fiited
