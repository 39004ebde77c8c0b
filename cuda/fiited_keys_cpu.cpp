// CPU kernel and schema of fiited::feature_keys: a batch's ids -> the store's keys, one pass.
//
// The ids of F features lie back to back (feature f: ids[id_starts[f]:id_starts[f + 1]]). Each
// id becomes its row (the id, or with `hash` mix64(id) mod num_entries[f], as
// store.layout.hash_ids), then the key ((row + row_offset[f]) & (2^56 - 1)) | key_base[f]
// (store.layout.entry_key). In PyTorch that is ~10 passes over the batch with a temporary each
// (12 ms of a 166 ms step at L=20, bench_lookup); here it is one.
//
// Without `hash`, an id outside [0, num_entries[f]) is not an error here: the op returns the
// position of the first one (or -1), and the caller names the feature and table in its error
// (modules/batch.py), before anything is changed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "fiited_checks.h"
#include "fiited_hash.h"

TORCH_LIBRARY_FRAGMENT(fiited, m) {
  //   ids         int32 | int64 (n)
  //   id_starts   int64 (F + 1), id_starts[0] = 0, id_starts[F] = n, non-decreasing
  //   key_base    int64 (F)   table_index << 56;  row_offset int64 (F);  num_entries int64 (F) > 0
  //   returns     keys int64 (n), first_bad int64 () (position of the first id outside its
  //               table without `hash`, -1 when none; the keys are then unspecified)
  m.def(
      "feature_keys(Tensor ids, Tensor id_starts, Tensor key_base, Tensor row_offset, "
      "Tensor num_entries, bool hash) -> (Tensor, Tensor)");
  // feature_keys into `keys` int64 (n), contiguous (a buffer the caller reuses across steps:
  // a fresh 34 MB output costs ~7 ms of page faults at 4.26M ids); returns first_bad.
  m.def(
      "feature_keys_out(Tensor ids, Tensor id_starts, Tensor key_base, Tensor row_offset, "
      "Tensor num_entries, bool hash, Tensor(a!) keys) -> Tensor");
  // store.layout.row_permutation of F features' rows back to back, bit for bit: feature f's
  // rows[id_starts[f]:id_starts[f + 1]] (+ shift[f] before an inverse) through the 4-round
  // Feistel bijection of [0, num_rows[f]), cycle-walked. Row-wise shards route ids by it (hash
  // ranges); 30 ms per direction for 164k ids in PyTorch (~40 passes plus the walk), one here.
  //   rows int64 (n) in [0, num_rows[f]) (- shift[f]); id_starts, num_rows (> 0), shift int64
  m.def(
      "row_permutation(Tensor rows, Tensor id_starts, Tensor num_rows, Tensor shift, "
      "bool inverse) -> Tensor");
  // values[b] repeated over bag b's ids: out[offsets[b]:offsets[b + 1]] = values[b], as
  // torch.repeat_interleave(values, offsets.diff(), output_size=num_ids), which costs an
  // index_select and a cumsum over the batch (27 ms of a 325 ms step, bench_lookup --mixed L=20).
  //   values int64 (nb);  offsets int64 (nb + 1), from 0 to num_ids, non-decreasing
  m.def("expand_bags(Tensor values, Tensor offsets, int num_ids) -> Tensor");
  // expand_bags into `out` int64 (num_ids), contiguous.
  m.def("expand_bags_out(Tensor values, Tensor offsets, Tensor(a!) out) -> ()");
  // Positions i, ascending, where values[i] == value: (values == value).nonzero().squeeze(1)
  // in one pass, without the n-byte mask (admission's misses: the ids probed to the null entry).
  //   values int64 (n);  returns int64 (m)
  m.def("positions_equal(Tensor values, int value) -> Tensor");
  // Positions i, ascending, where mask[values[i]]: mask[values].nonzero().squeeze(1) in one
  // pass (admission: the ids whose entry it displaced).
  //   values int64 (n) in [0, mask.numel());  mask bool (M);  returns int64 (m)
  m.def("positions_in(Tensor values, Tensor mask) -> Tensor");
}

namespace fiited {
namespace {

constexpr int64_t kRowMask = (int64_t{1} << 56) - 1;
constexpr int64_t kGrain = 1 << 15;

void check_long(const char* name, const at::Tensor& t, int64_t size) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == size,
              "[torchrec_fiited] fiited::feature_keys: ", name, " must be an int64 (", size,
              ") tensor, got ", t.scalar_type(), " ", t.sizes());
}

template <typename Id>
void keys_of(const Id* ids, const int64_t* starts, int64_t F, const int64_t* base,
             const int64_t* offset, const int64_t* entries, bool hash, int64_t n, int64_t* out,
             std::atomic<int64_t>& first_bad) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    // The feature of position `begin`: the last f with starts[f] <= begin.
    int64_t f = std::upper_bound(starts, starts + F + 1, begin) - starts - 1;
    int64_t bad = -1;
    for (int64_t i = begin; i < end; ++i) {
      while (i >= starts[f + 1]) ++f;
      const int64_t id = static_cast<int64_t>(ids[i]), E = entries[f];
      int64_t row = id;
      if (hash) {
        row = static_cast<int64_t>(fiited_mix64(static_cast<uint64_t>(id))) % E;
        if (row < 0) row += E;  // torch.remainder: the sign of the divisor
      } else if ((id < 0 || id >= E) && bad < 0) {
        bad = i;
      }
      out[i] = ((row + offset[f]) & kRowMask) | base[f];
    }
    if (bad >= 0) {
      int64_t seen = first_bad.load();
      while ((seen < 0 || bad < seen) && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    }
  });
}

at::Tensor feature_keys_out_cpu(
    const at::Tensor& ids, const at::Tensor& id_starts, const at::Tensor& key_base,
    const at::Tensor& row_offset, const at::Tensor& num_entries, bool hash, at::Tensor& keys) {
  TORCH_CHECK((ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt) && ids.dim() == 1,
              "[torchrec_fiited] fiited::feature_keys: ids must be a 1-D int32/int64 tensor, got ",
              ids.scalar_type(), " ", ids.sizes());
  const int64_t F = key_base.numel(), n = ids.numel();
  check_long("id_starts", id_starts, F + 1);
  check_long("key_base", key_base, F);
  check_long("row_offset", row_offset, F);
  check_long("num_entries", num_entries, F);
  check_long_out("fiited::feature_keys", "keys", keys, n, ids.device());
  const auto starts = id_starts.contiguous(), base = key_base.contiguous();
  const auto offset = row_offset.contiguous(), entries = num_entries.contiguous();
  const int64_t* s = starts.data_ptr<int64_t>();
  TORCH_CHECK(F >= 1 && s[0] == 0 && s[F] == n, "[torchrec_fiited] fiited::feature_keys: ",
              "id_starts must run from 0 to ids.numel()=", n);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(s[f] <= s[f + 1] && entries.data_ptr<int64_t>()[f] > 0,
                "[torchrec_fiited] fiited::feature_keys: id_starts must be non-decreasing and ",
                "num_entries positive, feature ", f);
  }
  const auto v = ids.contiguous();
  std::atomic<int64_t> first_bad{-1};
  if (v.scalar_type() == at::kLong) {
    keys_of(v.data_ptr<int64_t>(), s, F, base.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
            entries.data_ptr<int64_t>(), hash, n, keys.data_ptr<int64_t>(), first_bad);
  } else {
    keys_of(v.data_ptr<int32_t>(), s, F, base.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
            entries.data_ptr<int64_t>(), hash, n, keys.data_ptr<int64_t>(), first_bad);
  }
  return at::scalar_tensor(first_bad.load(), v.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> feature_keys_cpu(
    const at::Tensor& ids, const at::Tensor& id_starts, const at::Tensor& key_base,
    const at::Tensor& row_offset, const at::Tensor& num_entries, bool hash) {
  auto keys = at::empty({ids.numel()}, ids.options().dtype(at::kLong));
  auto bad = feature_keys_out_cpu(ids, id_starts, key_base, row_offset, num_entries, hash, keys);
  return {keys, bad};
}

// Round keys of store.layout._FEISTEL_KEYS, in order.
constexpr uint64_t kFeistelKeys[4] = {0x2545F4914F6CDD1Dull, 0x1B873593CC9E2D51ull,
                                      0x5BD1E9955BD1E995ull, 0x27D4EB2F165667C5ull};

inline uint64_t feistel(uint64_t x, int half, bool inverse) {
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t left = x >> half, right = x & mask;
  for (int r = 0; r < 4; ++r) {
    if (inverse) {  // undo (L, R) -> (R, L ^ F(R))
      const uint64_t prev_right = left;
      left = right ^ (fiited_mix64(left ^ kFeistelKeys[3 - r]) & mask);
      right = prev_right;
    } else {
      const uint64_t next_right = left ^ (fiited_mix64(right ^ kFeistelKeys[r]) & mask);
      left = right;
      right = next_right;
    }
  }
  return (left << half) | right;
}

at::Tensor row_permutation_cpu(const at::Tensor& rows, const at::Tensor& id_starts,
                               const at::Tensor& num_rows, const at::Tensor& shift, bool inverse) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1,
              "[torchrec_fiited] fiited::row_permutation: rows must be a 1-D int64 tensor, got ",
              rows.scalar_type(), " ", rows.sizes());
  const int64_t F = num_rows.numel(), n = rows.numel();
  TORCH_CHECK(id_starts.scalar_type() == at::kLong && id_starts.numel() == F + 1 &&
                  num_rows.scalar_type() == at::kLong && shift.scalar_type() == at::kLong &&
                  shift.numel() == F,
              "[torchrec_fiited] fiited::row_permutation: id_starts (F + 1), num_rows and shift "
              "(F) must be int64");
  const auto st = id_starts.contiguous(), nr = num_rows.contiguous(), sh = shift.contiguous();
  const int64_t *s = st.data_ptr<int64_t>(), *E = nr.data_ptr<int64_t>(),
                *add = sh.data_ptr<int64_t>();
  TORCH_CHECK(F >= 1 && s[0] == 0 && s[F] == n, "[torchrec_fiited] fiited::row_permutation: ",
              "id_starts must run from 0 to rows.numel()=", n);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(s[f] <= s[f + 1] && E[f] > 0,
                "[torchrec_fiited] fiited::row_permutation: id_starts must be non-decreasing and "
                "num_rows positive, feature ", f);
  }
  const auto v = rows.contiguous();
  const int64_t* in = v.data_ptr<int64_t>();
  auto out = at::empty({n}, v.options());
  int64_t* o = out.data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{-1};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t f = std::upper_bound(s, s + F + 1, begin) - s - 1, half_of = -1;
    int half = 1;
    for (int64_t i = begin; i < end; ++i) {
      while (i >= s[f + 1]) ++f;
      const int64_t rows_f = E[f], x = in[i] + add[f];
      if (half_of != f) {  // the smallest even bit count (>= 2) covering the feature's rows
        int bits = 2;
        while (bits < 63 && (int64_t{1} << bits) < rows_f) ++bits;
        half = (bits + 1) / 2;
        half_of = f;
      }
      if (x < 0 || x >= rows_f) {
        int64_t seen = first_bad.load();
        while ((seen < 0 || i < seen) && !first_bad.compare_exchange_weak(seen, i)) {
        }
        o[i] = x;
        continue;
      }
      uint64_t y = feistel(static_cast<uint64_t>(x), half, inverse);
      while (y >= static_cast<uint64_t>(rows_f)) y = feistel(y, half, inverse);
      o[i] = static_cast<int64_t>(y);
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad < 0, "[torchrec_fiited] fiited::row_permutation: row ", in[bad > 0 ? bad : 0],
              " at position ", bad, " is outside [0, num_rows) of its feature");
  return out;
}

void check_values(const char* op, const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kLong && values.dim() == 1, "[torchrec_fiited] ", op,
              ": values must be a 1-D int64 tensor, got ", values.scalar_type(), " ",
              values.sizes());
}

void expand_bags_out_cpu(const at::Tensor& values, const at::Tensor& offsets, at::Tensor& out) {
  constexpr const char* op = "fiited::expand_bags";
  const int64_t num_ids = out.numel();
  check_values(op, values);
  const int64_t nb = values.numel();
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.numel() == nb + 1,
              "[torchrec_fiited] ", op, ": offsets must be int64 (values.numel() + 1 = ", nb + 1,
              "), got ", offsets.scalar_type(), " ", offsets.sizes());
  const auto off = offsets.contiguous(), v = values.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[nb] == num_ids, "[torchrec_fiited] ", op,
              ": offsets must run from 0 to num_ids=", num_ids, ", got ", o[0], " to ", o[nb]);
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(o[b] <= o[b + 1], "[torchrec_fiited] ", op, ": offsets must be non-decreasing, "
                "got offsets[", b, "]=", o[b], " > offsets[", b + 1, "]=", o[b + 1]);
  }
  check_long_out(op, "out", out, num_ids, values.device());
  const int64_t* val = v.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, num_ids, kGrain, [&](int64_t begin, int64_t end) {
    // The bag of position `begin`: the last b with o[b] <= begin (empty bags skipped).
    int64_t b = std::upper_bound(o, o + nb + 1, begin) - o - 1;
    for (int64_t i = begin; i < end; ++b) {
      const int64_t stop = std::min(o[b + 1], end);
      std::fill(dst + i, dst + stop, val[b]);
      i = std::max(i, stop);
    }
  });
}

at::Tensor expand_bags_cpu(const at::Tensor& values, const at::Tensor& offsets, int64_t num_ids) {
  TORCH_CHECK(num_ids >= 0, "[torchrec_fiited] fiited::expand_bags: num_ids must be >= 0, got ",
              num_ids);
  auto out = at::empty({num_ids}, values.options().dtype(at::kLong));
  expand_bags_out_cpu(values, offsets, out);
  return out;
}

// Positions i of `values` (n) where keep(i), ascending: each task of kGrain ids collects its
// own, then they are concatenated in task order (so the result does not depend on the threads).
template <typename Keep>
at::Tensor collect_positions(const at::Tensor& values, int64_t n, const Keep& keep) {
  const int64_t tasks = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  std::vector<std::vector<int64_t>> found(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = t * kGrain, end = std::min(n, (t + 1) * kGrain); i < end; ++i) {
        if (keep(i)) found[t].push_back(i);
      }
    }
  });
  int64_t m = 0;
  for (const auto& f : found) m += static_cast<int64_t>(f.size());
  auto out = at::empty({m}, values.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  for (const auto& f : found) dst = std::copy(f.begin(), f.end(), dst);
  return out;
}

at::Tensor positions_equal_cpu(const at::Tensor& values, int64_t value) {
  check_values("fiited::positions_equal", values);
  const auto v = values.contiguous();
  const int64_t* p = v.data_ptr<int64_t>();
  return collect_positions(v, v.numel(), [p, value](int64_t i) { return p[i] == value; });
}

at::Tensor positions_in_cpu(const at::Tensor& values, const at::Tensor& mask) {
  constexpr const char* op = "fiited::positions_in";
  check_values(op, values);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 1, "[torchrec_fiited] ", op,
              ": mask must be a 1-D bool tensor, got ", mask.scalar_type(), " ", mask.sizes());
  const auto v = values.contiguous(), mk = mask.contiguous();
  const int64_t* p = v.data_ptr<int64_t>();
  const bool* in = mk.data_ptr<bool>();
  const int64_t M = mk.numel(), n = v.numel();
  std::atomic<int64_t> first_bad{-1};
  auto out = collect_positions(v, n, [&](int64_t i) {
    if (p[i] >= 0 && p[i] < M) return in[p[i]];
    int64_t seen = first_bad.load();
    while ((seen < 0 || i < seen) && !first_bad.compare_exchange_weak(seen, i)) {
    }
    return false;
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad < 0, "[torchrec_fiited] ", op, ": values[", bad, "]=", bad < 0 ? 0 : p[bad],
              " is outside [0, mask.numel()=", M, ")");
  return out;
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CPU, m) {
  m.impl("feature_keys", &fiited::feature_keys_cpu);
  m.impl("row_permutation", &fiited::row_permutation_cpu);
  m.impl("expand_bags", &fiited::expand_bags_cpu);
  m.impl("feature_keys_out", &fiited::feature_keys_out_cpu);
  m.impl("expand_bags_out", &fiited::expand_bags_out_cpu);
  m.impl("positions_equal", &fiited::positions_equal_cpu);
  m.impl("positions_in", &fiited::positions_in_cpu);
}
