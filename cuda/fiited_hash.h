// The resident-id hash table's key -> bucket map, shared by the CPU kernels, the CUDA kernels
// and (in Python) torchrec_fiited/ops/hash_reference.py, which must agree bit for bit. Needs only
// <cstdint>, so nvcc compiles it without torch (see fiited_cuda.h for why that matters).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FIITED_HASH_FN __host__ __device__ __forceinline__
#else
#define FIITED_HASH_FN inline
#endif

// The key of a free slot (int64 min); refused as an input key.
constexpr int64_t kFiitedEmptyKey = INT64_MIN;

// splitmix64's finalizer: a bijection of uint64 whose output bits each depend on every input bit.
FIITED_HASH_FN uint64_t fiited_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Bucket in [0, num_buckets) of `key`: the mix's high 32 bits scaled to the range (Lemire's
// multiply-shift), so num_buckets (<= 2^31) need not be a power of two.
FIITED_HASH_FN int64_t fiited_bucket_of(int64_t key, int64_t num_buckets) {
  return static_cast<int64_t>(
      ((fiited_mix64(static_cast<uint64_t>(key)) >> 32) * static_cast<uint64_t>(num_buckets)) >>
      32);
}
