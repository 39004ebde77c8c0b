// CUDA kernels of the resident-id hash table ops, with C-ABI launchers (fiited_hash_cuda.h).
// Compiles with nvcc alone; the torch-facing host (validation, dedupe, sort, compaction) is
// fiited_hash_cuda_host.cpp.

#include "fiited_hash.h"
#include "fiited_hash_cuda.h"

namespace {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Thread mapping: one warp per key; lane l compares slots l, l + 32, ... of the key's bucket
// (W / 32 coalesced loads at W >= 32), and a ballot finds the matching lane. A key is resident
// at most once, so at most one lane matches.
__global__ void __launch_bounds__(kBlockThreads)
    hash_lookup_kernel(const FiitedHashLookupParams p) {
  const int64_t i = (int64_t{blockIdx.x} * kBlockThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= p.num_keys) return;  // the whole warp leaves together
  const int64_t key = p.keys[i];
  const int64_t base = fiited_bucket_of(key, p.num_buckets) * p.bucket_size;
  int64_t slot = p.missing;
  for (int j0 = 0; j0 < p.bucket_size; j0 += kWarpSize) {
    const int j = j0 + lane;
    const bool hit = j < p.bucket_size && p.table_keys[base + j] == key;
    const unsigned ballot = __ballot_sync(kFullMask, hit);
    if (ballot != 0) {
      slot = base + j0 + __ffs(ballot) - 1;
      break;
    }
  }
  if (lane == 0) p.slots[i] = slot;
}

// Thread mapping: one thread per touched bucket, applying the rule to its candidates in their
// (score desc, key asc) order, exactly as the CPU kernel does: buckets own disjoint slots, so
// threads never write the same memory and the result does not depend on the schedule. A bucket
// rarely gets more than a few missing keys per batch, so the serial scan of W slots is short.
__global__ void __launch_bounds__(kBlockThreads)
    hash_insert_kernel(const FiitedHashInsertParams p) {
  const int64_t g = int64_t{blockIdx.x} * kBlockThreads + threadIdx.x;
  if (g >= p.num_groups) return;
  const int64_t first = p.group_starts[g], last = p.group_starts[g + 1];
  const int W = p.bucket_size;
  const int64_t base = fiited_bucket_of(p.cand_keys[first], p.num_buckets) * W;
  int64_t* keys = p.table_keys + base;
  float* scores = p.table_scores + base;
  uint8_t* taken = p.taken + base;
  for (int64_t c = first; c < last; ++c) {
    p.evicted_keys[c] = kFiitedEmptyKey;
    p.cand_slots[c] = -1;
    /* Step 1: the lowest free slot. */
    int j = 0;
    while (j < W && keys[j] != kFiitedEmptyKey) ++j;
    /* Step 2: else the weakest victim (not taken by the batch; ties: lowest slot), if beaten. */
    if (j == W) {
      int victim = -1;
      for (int v = 0; v < W; ++v) {
        if (!taken[v] && (victim < 0 || scores[v] < scores[victim])) victim = v;
      }
      if (victim < 0 || !(p.cand_scores[c] > scores[victim])) continue;
      j = victim;
      p.evicted_keys[c] = keys[j];
    }
    keys[j] = p.cand_keys[c];
    scores[j] = p.cand_scores[c];
    taken[j] = 1;
    p.cand_slots[c] = base + j;
  }
}

// Thread mapping: one warp per (distinct) key, the lookup's ballot, then lane 0 frees the slot.
__global__ void __launch_bounds__(kBlockThreads)
    hash_erase_kernel(const FiitedHashEraseParams p) {
  const int64_t i = (int64_t{blockIdx.x} * kBlockThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= p.num_keys) return;
  const int64_t key = p.keys[i];
  const int64_t base = fiited_bucket_of(key, p.num_buckets) * p.bucket_size;
  for (int j0 = 0; j0 < p.bucket_size; j0 += kWarpSize) {
    const int j = j0 + lane;
    const bool hit = j < p.bucket_size && p.table_keys[base + j] == key;
    const unsigned ballot = __ballot_sync(kFullMask, hit);
    if (ballot != 0) {
      if (lane == 0) {
        const int64_t slot = base + j0 + __ffs(ballot) - 1;
        p.table_keys[slot] = kFiitedEmptyKey;
        p.table_scores[slot] = 0.f;
        atomicAdd(p.num_erased, 1ull);
      }
      return;
    }
  }
}

// Thread mapping: one thread per key (the host sorts the insert's candidates by bucket).
__global__ void __launch_bounds__(kBlockThreads)
    hash_buckets_kernel(const FiitedHashBucketsParams p) {
  const int64_t i = int64_t{blockIdx.x} * kBlockThreads + threadIdx.x;
  if (i < p.num_keys) p.buckets[i] = fiited_bucket_of(p.keys[i], p.num_buckets);
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kBlockThreads - 1) / kBlockThreads);
}

}  // namespace

extern "C" cudaError_t fiited_hash_lookup_cuda(
    const FiitedHashLookupParams* params, cudaStream_t stream) {
  if (params->num_keys == 0) return cudaSuccess;
  hash_lookup_kernel<<<blocks_for(params->num_keys * kWarpSize), kBlockThreads, 0, stream>>>(
      *params);
  return cudaPeekAtLastError();
}

extern "C" cudaError_t fiited_hash_insert_cuda(
    const FiitedHashInsertParams* params, cudaStream_t stream) {
  if (params->num_groups == 0) return cudaSuccess;
  hash_insert_kernel<<<blocks_for(params->num_groups), kBlockThreads, 0, stream>>>(*params);
  return cudaPeekAtLastError();
}

extern "C" cudaError_t fiited_hash_erase_cuda(
    const FiitedHashEraseParams* params, cudaStream_t stream) {
  if (params->num_keys == 0) return cudaSuccess;
  hash_erase_kernel<<<blocks_for(params->num_keys * kWarpSize), kBlockThreads, 0, stream>>>(
      *params);
  return cudaPeekAtLastError();
}

extern "C" cudaError_t fiited_hash_buckets_cuda(
    const FiitedHashBucketsParams* params, cudaStream_t stream) {
  if (params->num_keys == 0) return cudaSuccess;
  hash_buckets_kernel<<<blocks_for(params->num_keys), kBlockThreads, 0, stream>>>(*params);
  return cudaPeekAtLastError();
}
