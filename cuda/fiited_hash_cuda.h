// CUDA kernels of the resident-id hash table ops behind a plain C ABI (parameter structs of raw
// pointers and launchers), torch-free like fiited_cuda.h so that `make nvcc-check` compiles them
// on a CPU-only machine. Semantics: torchrec_fiited/ops/hash_reference.py.
//
// Division of work with the (torch-facing) host: the host validates, dedupes the batch (unique
// keys, max score each), looks the unique keys up with fiited_hash_lookup_cuda, marks the slots
// of the residents in `taken`, and sorts the missing keys by (bucket, score desc, key asc) into
// groups, one per touched bucket. The insert kernel then applies the rule to each group, and the
// host compacts the evictions (ascending slot) from the per-candidate outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

extern "C" {

struct FiitedHashLookupParams {
  const int64_t* __restrict table_keys;  // (S)
  const int64_t* __restrict keys;        // (n), none equal to the empty key (host-checked)
  int64_t* __restrict slots;             // (n) out: slot or `missing`
  int64_t num_keys;                      // n
  int64_t num_buckets;
  int32_t bucket_size;                   // W, power of two <= 128
  int64_t missing;                       // written for a key that is not resident
};

struct FiitedHashBucketsParams {
  const int64_t* __restrict keys;  // (n)
  int64_t* __restrict buckets;     // (n) out: fiited_bucket_of(key, num_buckets)
  int64_t num_keys;
  int64_t num_buckets;
};

struct FiitedHashInsertParams {
  int64_t* __restrict table_keys;            // (S) updated
  float* __restrict table_scores;            // (S) updated
  uint8_t* __restrict taken;                 // (S) 1 at the batch's residents; set as keys land
  const int64_t* __restrict cand_keys;       // (m) missing unique keys, by (bucket, -score, key)
  const float* __restrict cand_scores;       // (m)
  const int64_t* __restrict group_starts;    // (G + 1) first candidate of each touched bucket
  int64_t* __restrict cand_slots;            // (m) out: slot or -1 (refused)
  int64_t* __restrict evicted_keys;          // (m) out: key evicted by the candidate, or empty key
  int64_t num_groups;                        // G
  int64_t num_buckets;
  int32_t bucket_size;
};

struct FiitedHashEraseParams {
  int64_t* __restrict table_keys;             // (S) updated
  float* __restrict table_scores;             // (S) updated
  const int64_t* __restrict keys;             // (n) distinct (the host dedupes)
  unsigned long long* __restrict num_erased;  // (1) incremented
  int64_t num_keys;
  int64_t num_buckets;
  int32_t bucket_size;
};

// Each launcher runs on `stream`, returns cudaSuccess at once when there is nothing to do, and
// otherwise the launch error (peeked, so the caller's C10_CUDA_KERNEL_LAUNCH_CHECK reads it).
cudaError_t fiited_hash_lookup_cuda(const FiitedHashLookupParams* params, cudaStream_t stream);
cudaError_t fiited_hash_insert_cuda(const FiitedHashInsertParams* params, cudaStream_t stream);
cudaError_t fiited_hash_erase_cuda(const FiitedHashEraseParams* params, cudaStream_t stream);
cudaError_t fiited_hash_buckets_cuda(const FiitedHashBucketsParams* params, cudaStream_t stream);

}  // extern "C"
