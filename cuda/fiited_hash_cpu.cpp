// CPU kernels of the resident-id hash table ops (schemas and semantics: fiited_hash_ops.cpp).
//
// lookup and erase's search run in parallel over keys, each scanning its key's bucket (W
// consecutive int64 keys, 4 cache lines at W=32), with the bucket of a key a few positions ahead
// prefetched so that several misses are in flight. insert sorts the batch by (bucket, key) and
// then runs the documented rule one bucket at a time, buckets in parallel: buckets own disjoint
// slots, and within a bucket the order is fixed by the rule, so the result does not depend on the
// number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <tuple>
#include <vector>

#include "fiited_checks.h"
#include "fiited_cpu_utils.h"
#include "fiited_hash.h"

namespace fiited {
namespace {

// Keys ahead whose bucket's first line is prefetched. A key takes the lowest free slot of its
// bucket, so the hot keys, inserted first, sit in line 0 (bench_lookup --mixed, L=20, after
// training: 93% of the hits, at a load of 0.93), and a probe rarely reads past it; prefetching all
// W / 8 lines cost 4x the line fills for that. One line at distance 16: 4.26M probes in 31 ms,
// against 39 ms for every line at distance 8 (2 threads).
constexpr int64_t kBucketPrefetchDistance = 16;

struct TableView {
  int64_t* __restrict keys;  // (S)
  float* __restrict scores;  // (S) or nullptr (lookup)
  int64_t num_buckets;
  int64_t bucket_size;       // W
};

TableView check_table(
    const char* op, const at::Tensor& table_keys, const at::Tensor* table_scores,
    int64_t bucket_size) {
  const int64_t num_buckets =
      check_hash_table(op, table_keys, table_scores, bucket_size, c10::DeviceType::CPU);
  return {table_keys.data_ptr<int64_t>(),
          table_scores == nullptr ? nullptr : table_scores->data_ptr<float>(), num_buckets,
          bucket_size};
}

void check_keys(const char* op, const at::Tensor& keys) {
  check_hash_keys(op, keys, at::Device(at::kCPU));
}

C10_ALWAYS_INLINE void prefetch_bucket(const TableView& t, int64_t key) {
  prefetch_read(t.keys + fiited_bucket_of(key, t.num_buckets) * t.bucket_size);
}

// One cache line (8 keys) per step, compared at once: a scalar scan with one branch per key
// cost 15 ns/key on bench_hash_table (a miss scans the whole bucket).
C10_ALWAYS_INLINE int64_t find_in_bucket(const TableView& t, int64_t key) {
  const int64_t base = fiited_bucket_of(key, t.num_buckets) * t.bucket_size;
  const int64_t* p = t.keys + base;
#if defined(__AVX2__)
  const __m256i k = _mm256_set1_epi64x(key);
  for (int64_t j = 0; j < t.bucket_size; j += 8) {
    const __m256i lo = _mm256_cmpeq_epi64(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j)), k);
    const __m256i hi = _mm256_cmpeq_epi64(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j + 4)), k);
    const int mask = _mm256_movemask_pd(_mm256_castsi256_pd(lo)) |
        (_mm256_movemask_pd(_mm256_castsi256_pd(hi)) << 4);
    if (mask != 0) return base + j + __builtin_ctz(mask);
  }
#else
  for (int64_t j = 0; j < t.bucket_size; j += 8) {
    bool any = false;
    for (int64_t l = 0; l < 8; ++l) any |= p[j + l] == key;
    if (any) {
      for (int64_t l = 0; l < 8; ++l) {
        if (p[j + l] == key) return base + j + l;
      }
    }
  }
#endif
  return -1;
}

// slots[i] = slot of keys[i] or -1, in parallel over i.
void find_slots(const char* op, const TableView& t, const int64_t* keys, int64_t n,
                int64_t* slots, int64_t missing = -1) {
  at::parallel_for(0, n, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kBucketPrefetchDistance < end) prefetch_bucket(t, keys[i + kBucketPrefetchDistance]);
      if (keys[i] == kFiitedEmptyKey) fail_empty_key(op, i);
      const int64_t slot = find_in_bucket(t, keys[i]);
      slots[i] = slot < 0 ? missing : slot;
    }
  });
}

// `missing` lets a caller read its own null entry for a miss without a second pass.
void hash_lookup_out_cpu(const at::Tensor& table_keys, int64_t bucket_size, const at::Tensor& keys,
                         int64_t missing, at::Tensor& out) {
  constexpr const char* op = "fiited::hash_lookup";
  const TableView t = check_table(op, table_keys, nullptr, bucket_size);
  check_keys(op, keys);
  check_long_out(op, "out", out, keys.numel(), keys.device());
  const auto k = keys.contiguous();
  find_slots(op, t, k.data_ptr<int64_t>(), k.numel(), out.data_ptr<int64_t>(), missing);
}

at::Tensor hash_lookup_cpu(const at::Tensor& table_keys, int64_t bucket_size,
                           const at::Tensor& keys, int64_t missing) {
  auto slots = at::empty({keys.numel()}, keys.options().dtype(at::kLong));
  hash_lookup_out_cpu(table_keys, bucket_size, keys, missing, slots);
  return slots;
}

// ---- insert -----------------------------------------------------------------------------------

struct Candidate {
  int64_t bucket;
  int64_t key;
  float score;
  int32_t index;  // position in the batch
};

// One unique key of a bucket's group: [first, last) of the sorted candidates, max score, slot.
struct UniqueKey {
  int64_t key;
  float score;
  int32_t first, last;
  int64_t slot;
};

// Applies the insert rule to one bucket's candidates (sorted by key), writing each candidate's
// slot to slots_out and the evictions of the bucket to evicted (slot, key).
void insert_into_bucket(
    const TableView& t, const Candidate* c, int64_t count, int64_t* __restrict slots_out,
    std::vector<UniqueKey>& uniques, std::vector<std::pair<int64_t, int64_t>>& evicted) {
  const int64_t W = t.bucket_size, base = c[0].bucket * W;
  int64_t* keys = t.keys + base;
  float* scores = t.scores + base;
  bool taken[128] = {};  // pinned residents of the batch, then the keys it inserts
  uniques.clear();
  for (int32_t i = 0; i < count; ++i) {  // 1. dedupe, max score
    if (i > 0 && c[i].key == c[i - 1].key) {
      uniques.back().score = std::max(uniques.back().score, c[i].score);
      uniques.back().last = i + 1;
    } else {
      uniques.push_back({c[i].key, c[i].score, i, i + 1, -1});
    }
  }
  std::vector<UniqueKey*> missing;
  for (UniqueKey& u : uniques) {  // 2. residents keep their slot and are pinned
    for (int64_t j = 0; j < W; ++j) {
      if (keys[j] == u.key) {
        u.slot = base + j;
        taken[j] = true;
        break;
      }
    }
    if (u.slot < 0) missing.push_back(&u);
  }
  std::sort(missing.begin(), missing.end(), [](const UniqueKey* a, const UniqueKey* b) {
    return a->score > b->score || (a->score == b->score && a->key < b->key);
  });
  for (UniqueKey* u : missing) {  // 3. lowest free slot, else the weakest victim if beaten
    int64_t j = 0;
    while (j < W && keys[j] != kFiitedEmptyKey) ++j;
    if (j == W) {
      int64_t victim = -1;
      for (int64_t v = 0; v < W; ++v) {
        if (!taken[v] && (victim < 0 || scores[v] < scores[victim])) victim = v;
      }
      if (victim < 0 || !(u->score > scores[victim])) continue;
      j = victim;
      evicted.emplace_back(base + j, keys[j]);
    }
    keys[j] = u->key;
    scores[j] = u->score;
    taken[j] = true;
    u->slot = base + j;
  }
  for (const UniqueKey& u : uniques) {
    for (int32_t i = u.first; i < u.last; ++i) slots_out[c[i].index] = u.slot;
  }
}

// Sorts by (bucket, key, index), a total order, so the result is the same for any thread count:
// each thread sorts a contiguous part, then the sorted parts are merged pairwise.
void sort_candidates(std::vector<Candidate>& cand) {
  const auto before = [](const Candidate& a, const Candidate& b) {
    return a.bucket != b.bucket ? a.bucket < b.bucket
        : a.key != b.key        ? a.key < b.key
                                : a.index < b.index;
  };
  const int64_t n = static_cast<int64_t>(cand.size());
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinWorkPerTask));
  std::vector<int64_t> bounds(parts + 1);
  for (int64_t p = 0; p <= parts; ++p) bounds[p] = n * p / parts;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      std::sort(cand.begin() + bounds[p], cand.begin() + bounds[p + 1], before);
    }
  });
  for (int64_t width = 1; width < parts; width *= 2) {
    for (int64_t p = 0; p + width < parts; p += 2 * width) {
      const int64_t last = bounds[std::min(p + 2 * width, parts)];
      std::inplace_merge(cand.begin() + bounds[p], cand.begin() + bounds[p + width],
                         cand.begin() + last, before);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hash_insert_cpu(
    at::Tensor& table_keys, at::Tensor& table_scores, int64_t bucket_size, const at::Tensor& keys,
    const at::Tensor& scores) {
  constexpr const char* op = "fiited::hash_insert";
  const TableView t = check_table(op, table_keys, &table_scores, bucket_size);
  check_keys(op, keys);
  const int64_t n = keys.numel();
  check_insert_scores(op, scores, keys);
  const auto k = keys.contiguous(), s = scores.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* sp = s.data_ptr<float>();
  auto slots = at::empty({n}, k.options());
  int64_t* out = slots.data_ptr<int64_t>();
  // Pre-pass, read-only: a key that is not resident, whose bucket is full and whose score does
  // not beat the bucket's weakest slot cannot be placed by the rule (within a batch a bucket's
  // minimum only rises and its free slots only go), so it skips the sort. Most of a batch at a
  // small budget: its cold ids. Its slot is looked up after the inserts (a duplicate of it with
  // a higher score may have been placed).
  std::vector<uint8_t> keep(n);
  at::parallel_for(0, n, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (kp[i] == kFiitedEmptyKey) fail_empty_key(op, i);
      TORCH_CHECK(sp[i] == sp[i], "[torchrec_fiited] ", op, ": scores must not be NaN, got NaN "
                  "at index ", i);
      const int64_t base = fiited_bucket_of(kp[i], t.num_buckets) * t.bucket_size;
      bool placeable = false;
      float weakest = 0.f;
      for (int64_t j = 0; j < t.bucket_size && !placeable; ++j) {
        const int64_t key = t.keys[base + j];
        placeable = key == kp[i] || key == kFiitedEmptyKey;
        weakest = j == 0 ? t.scores[base] : std::min(weakest, t.scores[base + j]);
      }
      keep[i] = placeable || sp[i] > weakest;
    }
  });
  std::vector<Candidate> cand;
  for (int64_t i = 0; i < n; ++i) {
    if (keep[i]) {
      cand.push_back(
          {fiited_bucket_of(kp[i], t.num_buckets), kp[i], sp[i], static_cast<int32_t>(i)});
    }
  }
  const int64_t m = static_cast<int64_t>(cand.size());
  sort_candidates(cand);
  std::vector<int64_t> starts;  // (G + 1) first candidate of each touched bucket
  for (int64_t i = 0; i < m; ++i) {
    if (i == 0 || cand[i].bucket != cand[i - 1].bucket) starts.push_back(i);
  }
  starts.push_back(m);
  const int64_t G = static_cast<int64_t>(starts.size()) - 1;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> evicted_per_task(
      std::max<int64_t>(1, at::get_num_threads()));
  // Grain: a bucket's work is ~ its candidates; 64 groups of ~1-2 keys per task at W=32.
  at::parallel_for(0, G, 64, [&](int64_t g0, int64_t g1) {
    std::vector<UniqueKey> uniques;
    auto& evicted = evicted_per_task[at::get_thread_num()];
    for (int64_t g = g0; g < g1; ++g) {
      insert_into_bucket(t, cand.data() + starts[g], starts[g + 1] - starts[g], out, uniques,
                         evicted);
    }
  });
  if (m < n) {
    at::parallel_for(0, n, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (!keep[i]) out[i] = find_in_bucket(t, kp[i]);
      }
    });
  }
  std::vector<std::pair<int64_t, int64_t>> evicted;
  for (const auto& e : evicted_per_task) evicted.insert(evicted.end(), e.begin(), e.end());
  std::sort(evicted.begin(), evicted.end());  // ascending slot: independent of the threads
  const auto v = static_cast<int64_t>(evicted.size());
  auto evicted_keys = at::empty({v}, k.options()), evicted_slots = at::empty({v}, k.options());
  for (int64_t i = 0; i < v; ++i) {
    evicted_slots.data_ptr<int64_t>()[i] = evicted[i].first;
    evicted_keys.data_ptr<int64_t>()[i] = evicted[i].second;
  }
  return {slots, evicted_keys, evicted_slots};
}

at::Tensor hash_erase_cpu(at::Tensor& table_keys, at::Tensor& table_scores, int64_t bucket_size,
                       const at::Tensor& keys) {
  constexpr const char* op = "fiited::hash_erase";
  const TableView t = check_table(op, table_keys, &table_scores, bucket_size);
  check_keys(op, keys);
  const auto k = keys.contiguous();
  const int64_t n = k.numel();
  const int64_t* kp = k.data_ptr<int64_t>();
  std::vector<int64_t> slots(n);
  find_slots(op, t, kp, n, slots.data());  // checks every key before anything changes
  int64_t erased = 0;
  for (int64_t i = 0; i < n; ++i) {  // serial: a repeated key is freed once
    const int64_t s = slots[i];
    if (s < 0 || t.keys[s] != kp[i]) continue;
    t.keys[s] = kFiitedEmptyKey;
    t.scores[s] = 0.f;
    ++erased;
  }
  return at::scalar_tensor(erased, k.options());
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CPU, m) {
  m.impl("hash_lookup", &fiited::hash_lookup_cpu);
  m.impl("hash_lookup_out", &fiited::hash_lookup_out_cpu);
  m.impl("hash_insert", &fiited::hash_insert_cpu);
  m.impl("hash_erase", &fiited::hash_erase_cpu);
}
