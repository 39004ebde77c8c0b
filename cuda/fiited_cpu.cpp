// CPU implementations of fiited::lookup_forward and fiited::fused_backward.
//
// Both ops are memory bound: every id costs K random chunk reads (and, in backward, K random
// read-modify-writes plus the entry's metadata). The kernels therefore
//   * never read a pruned chunk (a pruned table moves fewer bytes, which is where FIITED can beat
//     the unpruned TBE),
//   * prefetch the chunk_slots row and then the live chunks of ids a few iterations ahead, so
//     that several cache misses are in flight at once (FBGEMM's CPU TBE kernels do the same),
//   * keep each bag's (each entry's) D accumulators in SIMD registers (fiited_cpu_utils.h),
//   * allocate nothing per step beyond the op's output: the backward's sort buffers are reused
//     across calls, because first-touch of fresh memory runs at 2.3-3.9 GB/s on the development
//     machine, slower than the gather itself (shared/reference/performance-anchors.md),
//   * split the work across threads by ids, not by bags or entries (parallel_balanced).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fiited_checks.h"
#include "fiited_cpu_sort.h"
#include "fiited_cpu_utils.h"

namespace fiited {
namespace {

// Ids ahead of the current one whose chunk_slots row is prefetched, and (nearer) whose live
// chunks are prefetched; the chunk distance is shorter so that its chunk_slots read hits.
// 24/12 measured 5-10% faster than 16/8 and 25% faster than 8/4 (forward, K=4, L=20, one thread).
constexpr int64_t kSlotsPrefetchDistance = 24;
constexpr int64_t kChunkPrefetchDistance = 12;
// Sorted ids ahead whose gradient row the backward prefetches (-15% backward time, K=4, L=20,
// one thread: 7.6 -> 6.2 ms per table).
constexpr int64_t kGradRowPrefetchDistance = 12;

// ---- lookup_forward ---------------------------------------------------------------------------

template <typename SlotT>  // int16_t or int32_t: chunk_slots' dtype
struct LookupArgs {
  const float* __restrict weights;             // (C, chunk_size)
  const SlotT* __restrict chunk_slots;         // (E, K)
  const int64_t* __restrict entries;           // (n)
  const int64_t* __restrict offsets;           // (B + 1)
  const float* __restrict per_sample_weights;  // (n) or nullptr
  float* __restrict out;                       // (B, >= K * chunk_size), rows out_stride apart
  int64_t out_stride;
  LookupSizes sizes;
  bool mean;
  // Table-batched lookups (lookup_forward_batched_out): bag b is row b % bags_per_feature of
  // feature f = b / bags_per_feature, written at column feature_cols[f], divided by its length
  // where feature_mean[f]. nullptr for the single-feature ops: column 0, `mean` for every bag.
  const int64_t* __restrict feature_cols;      // (F) or nullptr
  const bool* __restrict feature_mean;         // (F) or nullptr
  int64_t bags_per_feature;
};

constexpr const char* kLookup = "fiited::lookup_forward";
constexpr const char* kBackward = "fiited::fused_backward";

// Prefetches the chunk_slots row of id i + kSlotsPrefetchDistance and the live chunks of id
// i + kChunkPrefetchDistance (ids past id_end or out of range are skipped).
template <typename SlotT>
C10_ALWAYS_INLINE void prefetch_lookup(
    const LookupArgs<SlotT>& a, int64_t i, int64_t id_end, int64_t K, int64_t cs) {
  const int64_t E = a.sizes.num_entries;
  if (i + kSlotsPrefetchDistance < id_end) {
    const int64_t e = a.entries[i + kSlotsPrefetchDistance];
    if (!outside(e, E)) prefetch_read(a.chunk_slots + e * K);
  }
  if (i + kChunkPrefetchDistance >= id_end) return;
  const int64_t e = a.entries[i + kChunkPrefetchDistance];
  if (outside(e, E)) return;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t s = a.chunk_slots[e * K + k];
    if (!outside(s, a.sizes.capacity)) prefetch_chunk(a.weights + s * cs, cs, false);
  }
}

// Pools bags [bag_begin, bag_end) into a.out; S fixes K and chunk_size when they are common.
template <typename S, typename SlotT>
void pool_bags(const LookupArgs<SlotT>& a, int64_t bag_begin, int64_t bag_end) {
  constexpr int W = S::W;
  const int64_t K = S::D ? S::K : a.sizes.num_chunks;
  const int64_t cs = S::D ? S::cs : a.sizes.chunk_size, V = cs / W, D = K * cs;
  const int64_t E = a.sizes.num_entries, C = a.sizes.capacity, id_end = a.offsets[bag_end];
  Accumulator<S> acc(D);
  for (int64_t b = bag_begin; b < bag_end; ++b) {
    acc.zero();
    const int64_t start = a.offsets[b], end = a.offsets[b + 1];
    for (int64_t i = start; i < end; ++i) {
      prefetch_lookup(a, i, id_end, K, cs);
      const int64_t e = a.entries[i];
      if (outside(e, E)) fail_out_of_range(kLookup, "entries", i, e, E, "E");
      // Multiplying by 1 is exact, so one loop serves weighted and unweighted bags.
      const Vec<W> w = splat<W>(a.per_sample_weights ? a.per_sample_weights[i] : 1.f);
#pragma GCC unroll 8
      for (int64_t k = 0; k < K; ++k) {
        const int32_t s = a.chunk_slots[e * K + k];
        if (s < 0) continue;  // pruned: reads as zeros, nothing to load
        if (s >= C) fail_corrupted_slot(kLookup, s, C);
        const float* src = a.weights + int64_t{s} * cs;
#pragma GCC unroll 32
        for (int64_t v = 0; v < V; ++v) acc[k * V + v] += w * vload<W>(src + v * W);
      }
    }
    // Division, not a multiply by 1 / length, to round as the reference does.
    const int64_t f = b / a.bags_per_feature;
    const bool divide = (a.feature_mean ? a.feature_mean[f] : a.mean) && end > start;
    const Vec<W> length = splat<W>(static_cast<float>(end - start));
    float* out = a.out + (b - f * a.bags_per_feature) * a.out_stride +
                 (a.feature_cols ? a.feature_cols[f] : 0);
    for (int64_t j = 0; j < D / W; ++j) vstore<W>(out + j * W, divide ? acc[j] / length : acc[j]);
  }
}

void check_offsets(const at::Tensor& offsets, int64_t num_ids) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t B = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0, "[torchrec_fiited] ", kLookup, ": offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(
      o[B] <= num_ids, "[torchrec_fiited] ", kLookup, ": offsets[-1] must be <= entries.numel()=",
      num_ids, ", got ", o[B]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(
        o[b] <= o[b + 1], "[torchrec_fiited] ", kLookup, ": offsets must be non-decreasing, got ",
        "offsets[", b, "]=", o[b], " > offsets[", b + 1, "]=", o[b + 1]);
  }
}

// Pools into `out` (validated by the caller: (B, D) fp32, unit column stride; for batched
// lookups (B / F, W) with feature f's block at columns [feature_cols[f], + D)).
void pool_into(
    const LookupSizes& sizes,
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean,
    at::Tensor& out,
    const at::Tensor& feature_cols = at::Tensor(),
    const at::Tensor& feature_mean = at::Tensor()) {
  const auto w = weights.contiguous(), slots = chunk_slots.contiguous();
  const auto ids = entries.contiguous(), offs = offsets.contiguous();
  const auto psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  check_offsets(offs, sizes.num_ids);
  const bool batched = feature_cols.defined();
  const auto run = [&](auto slot_type) {  // int16_t or int32_t: chunk_slots' dtype
    using SlotT = decltype(slot_type);
    const LookupArgs<SlotT> args{
        w.data_ptr<float>(), slots.data_ptr<SlotT>(), ids.data_ptr<int64_t>(),
        offs.data_ptr<int64_t>(), psw.defined() ? psw.data_ptr<float>() : nullptr,
        out.data_ptr<float>(), out.stride(0), sizes, mean,
        batched ? feature_cols.data_ptr<int64_t>() : nullptr,
        batched ? feature_mean.data_ptr<bool>() : nullptr,
        batched ? sizes.num_bags / feature_cols.numel() : std::max<int64_t>(sizes.num_bags, 1)};
    const int64_t* o = args.offsets;
    dispatch_shape(sizes.num_chunks, sizes.chunk_size, [&](auto shape) {
      parallel_balanced(
          sizes.num_bags, [o](int64_t b) { return o[b]; },
          [&](int64_t begin, int64_t end) { pool_bags<decltype(shape), SlotT>(args, begin, end); });
    });
  };
  if (slots.scalar_type() == at::kShort) {
    run(int16_t{});
  } else {
    run(int32_t{});
  }
}

at::Tensor lookup_forward_cpu(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean) {
  const LookupSizes sizes =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  auto out = at::empty({sizes.num_bags, sizes.num_chunks * sizes.chunk_size}, weights.options());
  pool_into(sizes, weights, chunk_slots, entries, offsets, per_sample_weights, mean, out);
  return out;
}

void lookup_forward_out_cpu(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean,
    at::Tensor& out) {
  const LookupSizes sizes =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  check_lookup_out(out, sizes, weights.device());
  pool_into(sizes, weights, chunk_slots, entries, offsets, per_sample_weights, mean, out);
}

// Every feature of a pool in one call: F features' bags back to back in `offsets`
// (F * B + 1), each written into its column block of `out` (B, W).
void lookup_forward_batched_out_cpu(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& feature_cols,
    const at::Tensor& feature_mean,
    at::Tensor& out) {
  const LookupSizes sizes =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  const auto cols = feature_cols.contiguous(), means = feature_mean.contiguous();
  check_batched_out(out, cols, means, sizes, weights.device());
  pool_into(sizes, weights, chunk_slots, entries, offsets, per_sample_weights, false, out, cols,
            means);
}

// ---- fused_backward ---------------------------------------------------------------------------

// Every entry and bag row must be valid before anything is updated in place. Entry -1 skips
// the id; entries E .. E + G - 1 are the miss groups.
void check_backward_ids(const int64_t* entries, const int64_t* row_of_id, const BackwardSizes& s) {
  const int64_t end_entry = s.num_entries + s.num_miss_groups;
  at::parallel_for(0, s.num_ids, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (entries[i] != -1 && outside(entries[i], end_entry)) {
        fail_out_of_range(kBackward, "entries", i, entries[i], end_entry,
                          s.num_miss_groups ? "E + G (G = miss_utilities.size(0))" : "E");
      }
      if (outside(row_of_id[i], s.num_rows)) {
        fail_out_of_range(kBackward, "row_of_id", i, row_of_id[i], s.num_rows,
                          "R=grad_rows.size(0)");
      }
    }
  });
}

template <typename SlotT>  // int16_t or int32_t: chunk_slots' dtype
struct BackwardArgs {
  const float* __restrict grad_rows;          // (R, D)
  const int64_t* __restrict row_of_id;        // (n)
  const float* __restrict id_scale;           // (n) or nullptr
  const SlotT* __restrict chunk_slots;        // (E, K)
  float* __restrict utilities;                // (E, K)
  float* __restrict miss_utilities;           // (G, K) or nullptr: entries E + g
  float* __restrict weights;                  // (C, chunk_size)
  float* __restrict momentum;                 // (C, chunk_size) | (C) | (0)
  const uint32_t* __restrict sorted_entries;  // (n) entries in ascending order
  const int32_t* __restrict sorted_ids;       // (n) id of each sorted entry
  const int32_t* __restrict segment_starts;   // (U + 1)
  BackwardSizes sizes;
  float lr, eps, weight_decay, utility_scale;
};

// acc (D) = sum over the ids of unique entry u of id_scale[i] * grad_rows[row_of_id[i]], summed
// in id order like the reference's index_add_.
template <typename S, typename SlotT>
void coalesce(const BackwardArgs<SlotT>& a, int64_t u, int64_t D, Accumulator<S>& acc) {
  constexpr int W = S::W;
  acc.zero();
  for (int64_t j = a.segment_starts[u]; j < a.segment_starts[u + 1]; ++j) {
    if (j + kGradRowPrefetchDistance < a.sizes.num_ids) {
      const int64_t ahead = a.sorted_ids[j + kGradRowPrefetchDistance];
      prefetch_chunk(a.grad_rows + a.row_of_id[ahead] * D, D, false);
    }
    const int64_t i = a.sorted_ids[j];
    const float* g = a.grad_rows + a.row_of_id[i] * D;
    const Vec<W> scale = splat<W>(a.id_scale ? a.id_scale[i] : 1.f);
#pragma GCC unroll 32
    for (int64_t v = 0; v < D / W; ++v) acc[v] += vload<W>(g + v * W) * scale;
  }
}

// u (K) += accesses * (||g_chunk|| or 1) * scale for all K chunks (an entry's utilities are
// stored against the table's base step, see the schema; a miss group's are as of now, scale 1).
template <typename S>
void update_utilities(float* u, float scale, bool grad_access, int64_t K, int64_t V,
                      int64_t accesses, Accumulator<S>& acc) {
  constexpr int W = S::W;
  const float count = static_cast<float>(accesses);
  for (int64_t k = 0; k < K; ++k) {
    float gain = 1.f;
    if (grad_access) {
      Vec<W> sq{};
      for (int64_t v = 0; v < V; ++v) sq += acc[k * V + v] * acc[k * V + v];
      gain = std::sqrt(hsum<W>(sq));
    }
    u[k] += count * gain * scale;
  }
}

// One optimizer step on the live chunk at `slot` with gradient g (V vectors of W floats), plus
// weight decay. Formulas follow FBGEMM's EXACT_(ROWWISE_)ADAGRAD.
template <int W, typename SlotT>
void apply_optimizer(const BackwardArgs<SlotT>& a, int64_t slot, int64_t V, Vec<W>* g) {
  const int64_t cs = V * W;
  float* w = a.weights + slot * cs;
  if (a.weight_decay != 0.f) {
    for (int64_t v = 0; v < V; ++v) g[v] += splat<W>(a.weight_decay) * vload<W>(w + v * W);
  }
  if (a.sizes.optimizer == Optimizer::kRowwiseAdagrad) {
    Vec<W> sq{};
    for (int64_t v = 0; v < V; ++v) sq += g[v] * g[v];
    const float state = a.momentum[slot] + hsum<W>(sq) / static_cast<float>(cs);
    a.momentum[slot] = state;
    const Vec<W> step_size = splat<W>(a.lr / (std::sqrt(state) + a.eps));
    for (int64_t v = 0; v < V; ++v) vstore<W>(w + v * W, vload<W>(w + v * W) - step_size * g[v]);
  } else if (a.sizes.optimizer == Optimizer::kAdagrad) {
    float* m = a.momentum + slot * cs;
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t l = 0; l < W; ++l) {
        const float gc = lane<W>(g[v], l);
        m[v * W + l] += gc * gc;
        w[v * W + l] -= a.lr * gc / (std::sqrt(m[v * W + l]) + a.eps);
      }
    }
  } else {
    const Vec<W> lr = splat<W>(a.lr);
    for (int64_t v = 0; v < V; ++v) vstore<W>(w + v * W, vload<W>(w + v * W) - lr * g[v]);
  }
}

// Prefetches the metadata of unique entry u + kSlotsPrefetchDistance and the live chunks (and
// their rowwise state) of entry u + kChunkPrefetchDistance (a miss group has neither).
template <typename SlotT>
C10_ALWAYS_INLINE void prefetch_update(
    const BackwardArgs<SlotT>& a, int64_t u, int64_t u_end, int64_t K, int64_t cs) {
  const int64_t E = a.sizes.num_entries;
  if (u + kSlotsPrefetchDistance < u_end) {
    const int64_t e = a.sorted_entries[a.segment_starts[u + kSlotsPrefetchDistance]];
    if (e < E) {
      prefetch_read(a.chunk_slots + e * K);
      prefetch_write(a.utilities + e * K);
    } else {
      prefetch_write(a.miss_utilities + (e - E) * K);
    }
  }
  if (u + kChunkPrefetchDistance >= u_end) return;
  const int64_t e = a.sorted_entries[a.segment_starts[u + kChunkPrefetchDistance]];
  if (e >= E) return;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t s = a.chunk_slots[e * K + k];
    if (outside(s, a.sizes.capacity)) continue;
    prefetch_chunk(a.weights + s * cs, cs, true);
    if (a.sizes.optimizer == Optimizer::kRowwiseAdagrad) prefetch_write(a.momentum + s);
  }
}

template <typename S, typename SlotT>
void update_entries(const BackwardArgs<SlotT>& a, int64_t u_begin, int64_t u_end) {
  constexpr int W = S::W;
  const int64_t K = S::D ? S::K : a.sizes.num_chunks;
  const int64_t cs = S::D ? S::cs : a.sizes.chunk_size, V = cs / W, C = a.sizes.capacity;
  const int64_t E = a.sizes.num_entries;
  Accumulator<S> acc(K * cs);
  for (int64_t u = u_begin; u < u_end; ++u) {
    prefetch_update(a, u, u_end, K, cs);
    const int64_t e = a.sorted_entries[a.segment_starts[u]];
    const int64_t accesses = a.segment_starts[u + 1] - a.segment_starts[u];
    coalesce<S>(a, u, K * cs, acc);
    if (e >= E) {  // a miss group: what it earns, as of now; it holds no chunk
      update_utilities<S>(a.miss_utilities + (e - E) * K, 1.f, a.sizes.grad_access, K, V,
                          accesses, acc);
      continue;
    }
    update_utilities<S>(a.utilities + e * K, a.utility_scale, a.sizes.grad_access, K, V,
                        accesses, acc);
#pragma GCC unroll 8
    for (int64_t k = 0; k < K; ++k) {
      const int32_t s = a.chunk_slots[e * K + k];
      if (s < 0) continue;  // pruned: utility only
      if (s >= C) fail_corrupted_slot(kBackward, s, C);
      apply_optimizer<W>(a, s, V, &acc[k * V]);
    }
  }
}

void fused_backward_cpu(
    const at::Tensor& grad_rows,
    const at::Tensor& row_of_id,
    const std::optional<at::Tensor>& id_scale,
    const at::Tensor& entries,
    const at::Tensor& chunk_slots,
    at::Tensor& utilities,
    at::Tensor& weights,
    at::Tensor& momentum,
    c10::string_view optimizer,
    double lr,
    double eps,
    double weight_decay,
    c10::string_view utility,
    double utility_scale,
    const std::optional<at::Tensor>& miss_utilities) {
  const BackwardSizes sizes = check_backward_inputs(
      grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, weights, momentum,
      optimizer, utility, utility_scale, miss_utilities);
  if (sizes.num_ids == 0) return;
  const auto grads = grad_rows.contiguous(), rows = row_of_id.contiguous();
  const auto ids = entries.contiguous(), slots = chunk_slots.contiguous();
  const auto scale = id_scale.has_value() ? id_scale->contiguous() : at::Tensor();
  check_backward_ids(ids.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), sizes);
  SortWorkspace& ws = sort_workspace(sizes.num_ids);
  const int src = sort_by_entry(ws, ids.data_ptr<int64_t>(), sizes.num_ids,
                                sizes.num_entries + sizes.num_miss_groups);
  const float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const auto run = [&](auto slot_type) {
    using SlotT = decltype(slot_type);
    const BackwardArgs<SlotT> args{
        grads.data_ptr<float>(), rows.data_ptr<int64_t>(), scale_ptr, slots.data_ptr<SlotT>(),
        utilities.data_ptr<float>(),
        miss_utilities.has_value() ? miss_utilities->data_ptr<float>() : nullptr,
        weights.data_ptr<float>(), momentum.data_ptr<float>(), ws.keys[src].data(), ws.ids[src].data(), ws.segment_starts.data(), sizes,
        static_cast<float>(lr), static_cast<float>(eps), static_cast<float>(weight_decay),
        static_cast<float>(utility_scale)};
    const int64_t num_unique = static_cast<int64_t>(ws.segment_starts.size()) - 1;
    const int32_t* starts = args.segment_starts;
    dispatch_shape(sizes.num_chunks, sizes.chunk_size, [&](auto shape) {
      parallel_balanced(
          num_unique, [starts](int64_t u) { return int64_t{starts[u]}; },
          [&](int64_t begin, int64_t end) {
            update_entries<decltype(shape), SlotT>(args, begin, end);
          });
    });
  };
  if (slots.scalar_type() == at::kShort) {
    run(int16_t{});
  } else {
    run(int32_t{});
  }
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CPU, m) {
  m.impl("lookup_forward", &fiited::lookup_forward_cpu);
  m.impl("lookup_forward_out", &fiited::lookup_forward_out_cpu);
  m.impl("lookup_forward_batched_out", &fiited::lookup_forward_batched_out_cpu);
  m.impl("fused_backward", &fiited::fused_backward_cpu);
}
