// CUDA registration of the resident-id hash table ops (schemas: fiited_hash_ops.cpp; semantics:
// torchrec_fiited/ops/hash_reference.py; kernels: fiited_hash_cuda.cu). Built only against a CUDA
// torch (see setup.py).
//
// insert runs the CPU kernel's rule in three parts: here the batch is deduped (max score per
// key), its residents are found and pinned, and the missing keys are sorted by (bucket, score
// desc, key asc) into one group per touched bucket; the kernel applies the rule to each group
// (a thread per bucket: buckets own disjoint slots, so the result is the CPU kernel's); then the
// evictions are compacted in ascending slot order. Every input is checked before the first
// kernel runs, so a refused call leaves the table unchanged, as on the CPU.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fiited_checks.h"
#include "fiited_hash.h"
#include "fiited_hash_cuda.h"

namespace fiited {
namespace {

static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the erase counter is an int64");

struct TableShape {
  int64_t num_buckets;
  int32_t bucket_size;  // W
};

TableShape check_table(const char* op, const at::Tensor& table_keys,
                       const at::Tensor* table_scores, int64_t bucket_size) {
  return {check_hash_table(op, table_keys, table_scores, bucket_size, c10::DeviceType::CUDA),
          static_cast<int32_t>(bucket_size)};
}

// The CPU kernels refuse the empty-slot key as they meet it; here one reduction (a device sync)
// finds it before anything runs.
void check_keys(const char* op, const at::Tensor& keys, const at::Tensor& table_keys) {
  check_hash_keys(op, keys, table_keys.device());
  if (keys.numel() == 0) return;
  const auto empty = keys.eq(kFiitedEmptyKey);
  if (empty.any().item<bool>()) fail_empty_key(op, empty.nonzero()[0][0].item<int64_t>());
}

void lookup_into(const TableShape& t, const at::Tensor& table_keys, const at::Tensor& keys,
                 int64_t missing, at::Tensor& out) {
  const FiitedHashLookupParams params{
      table_keys.data_ptr<int64_t>(), keys.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
      keys.numel(), t.num_buckets, t.bucket_size, missing};
  (void)fiited_hash_lookup_cuda(&params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void hash_lookup_out_cuda(const at::Tensor& table_keys, int64_t bucket_size,
                          const at::Tensor& keys, int64_t missing, at::Tensor& out) {
  constexpr const char* op = "fiited::hash_lookup";
  const TableShape t = check_table(op, table_keys, nullptr, bucket_size);
  const c10::cuda::CUDAGuard guard(table_keys.device());
  check_keys(op, keys, table_keys);
  check_long_out(op, "out", out, keys.numel(), keys.device());
  lookup_into(t, table_keys, keys.contiguous(), missing, out);
}

at::Tensor hash_lookup_cuda(const at::Tensor& table_keys, int64_t bucket_size,
                            const at::Tensor& keys, int64_t missing) {
  auto slots = at::empty({keys.numel()}, keys.options().dtype(at::kLong));
  hash_lookup_out_cuda(table_keys, bucket_size, keys, missing, slots);
  return slots;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hash_insert_cuda(
    at::Tensor& table_keys, at::Tensor& table_scores, int64_t bucket_size, const at::Tensor& keys,
    const at::Tensor& scores) {
  constexpr const char* op = "fiited::hash_insert";
  const TableShape t = check_table(op, table_keys, &table_scores, bucket_size);
  const c10::cuda::CUDAGuard guard(table_keys.device());
  check_keys(op, keys, table_keys);
  const int64_t n = keys.numel();
  check_insert_scores(op, scores, keys);
  if (n > 0) {
    const auto nan = scores.isnan();
    TORCH_CHECK(!nan.any().item<bool>(), "[torchrec_fiited] ", op,
                ": scores must not be NaN, got NaN at index ", nan.nonzero()[0][0].item<int64_t>());
  }
  const auto opts = keys.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  const auto stream = c10::cuda::getCurrentCUDAStream();

  // 1. Unique keys (ascending), the max score of each.
  const auto [uniq, inverse, counts] = at::_unique2(keys, /*sorted=*/true, /*return_inverse=*/true,
                                                    /*return_counts=*/false);
  (void)counts;
  const int64_t u = uniq.numel();
  const auto best = at::empty({u}, scores.options())
                        .scatter_reduce_(0, inverse, scores.contiguous(), "amax",
                                         /*include_self=*/false);
  // 2. Residents keep their slot and are pinned for the batch.
  auto slots_u = at::empty({u}, opts);
  lookup_into(t, table_keys, uniq, -1, slots_u);
  const auto resident = slots_u.ge(0);
  auto taken = at::zeros({table_keys.numel()}, opts.dtype(at::kByte));
  taken.index_fill_(0, slots_u.masked_select(resident), 1);
  // 3. The missing keys by (bucket, score desc, key asc): stable sorts, the last key first
  //    (uniq is already in key order).
  const auto missing_at = resident.logical_not().nonzero().squeeze(1);
  const int64_t m = missing_at.numel();
  auto evicted_keys = at::empty({0}, opts), evicted_slots = at::empty({0}, opts);
  if (m > 0) {
    const auto miss_keys = uniq.index_select(0, missing_at);
    auto order = std::get<1>(at::sort(best.index_select(0, missing_at), /*stable=*/true,
                                      /*dim=*/0, /*descending=*/true));
    auto buckets = at::empty({m}, opts);
    const FiitedHashBucketsParams bp{miss_keys.data_ptr<int64_t>(), buckets.data_ptr<int64_t>(),
                                     m, t.num_buckets};
    (void)fiited_hash_buckets_cuda(&bp, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    order = order.index_select(
        0, std::get<1>(at::sort(buckets.index_select(0, order), /*stable=*/true, 0, false)));
    const auto cand_keys = miss_keys.index_select(0, order).contiguous();
    const auto cand_scores = best.index_select(0, missing_at).index_select(0, order).contiguous();
    const auto per_bucket =
        std::get<2>(at::unique_consecutive(buckets.index_select(0, order), false, true));
    auto starts = at::zeros({per_bucket.numel() + 1}, opts);
    starts.slice(0, 1).copy_(per_bucket.cumsum(0));
    auto cand_slots = at::empty({m}, opts), cand_evicted = at::empty({m}, opts);
    const FiitedHashInsertParams ip{
        table_keys.data_ptr<int64_t>(), table_scores.data_ptr<float>(), taken.data_ptr<uint8_t>(),
        cand_keys.data_ptr<int64_t>(), cand_scores.data_ptr<float>(), starts.data_ptr<int64_t>(),
        cand_slots.data_ptr<int64_t>(), cand_evicted.data_ptr<int64_t>(), per_bucket.numel(),
        t.num_buckets, t.bucket_size};
    (void)fiited_hash_insert_cuda(&ip, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    slots_u.index_copy_(0, missing_at.index_select(0, order), cand_slots);
    // 4. Evictions in ascending slot order (the CPU kernel's).
    const auto evicted = cand_evicted.ne(kFiitedEmptyKey);
    auto [by_slot, at_slot] = at::sort(cand_slots.masked_select(evicted));
    evicted_slots = by_slot;
    evicted_keys = cand_evicted.masked_select(evicted).index_select(0, at_slot);
  }
  return {slots_u.index_select(0, inverse), evicted_keys, evicted_slots};
}

at::Tensor hash_erase_cuda(at::Tensor& table_keys, at::Tensor& table_scores, int64_t bucket_size,
                           const at::Tensor& keys) {
  constexpr const char* op = "fiited::hash_erase";
  const TableShape t = check_table(op, table_keys, &table_scores, bucket_size);
  const c10::cuda::CUDAGuard guard(table_keys.device());
  check_keys(op, keys, table_keys);
  auto erased = at::zeros({}, keys.options().dtype(at::kLong));
  if (keys.numel() == 0) return erased;
  const auto distinct = std::get<0>(at::_unique2(keys, false, false, false));  // freed once each
  const FiitedHashEraseParams params{
      table_keys.data_ptr<int64_t>(), table_scores.data_ptr<float>(),
      distinct.data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(erased.data_ptr<int64_t>()), distinct.numel(),
      t.num_buckets, t.bucket_size};
  (void)fiited_hash_erase_cuda(&params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return erased;
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CUDA, m) {
  m.impl("hash_lookup", &fiited::hash_lookup_cuda);
  m.impl("hash_lookup_out", &fiited::hash_lookup_out_cuda);
  m.impl("hash_insert", &fiited::hash_insert_cuda);
  m.impl("hash_erase", &fiited::hash_erase_cuda);
}
