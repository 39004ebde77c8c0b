// CUDA kernels of the FIITED ops behind a plain C ABI: parameter structs of raw pointers and two
// launchers. This header and fiited_cuda.cu need only the CUDA toolkit, not torch.
//
// Why the split: the CPU torch wheel ships c10/cuda headers without the generated
// c10/cuda/impl/cuda_cmake_macros.h, so a .cu that includes torch cannot be compiled by nvcc on a
// CPU-only machine. Keeping the kernels torch-free lets `make nvcc-check` compile them anywhere
// nvcc is installed, so they cannot rot; the torch-facing registration (input checks, the
// dedupe sort, the current stream, C10_CUDA_KERNEL_LAUNCH_CHECK) is the thin
// fiited_cuda_host.cpp, built only against a CUDA torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

extern "C" {

// Largest D = K * chunk_size the backward kernel takes: it keeps each warp's coalesced gradient
// (D floats) in shared memory, 4 warps per block, within the default 48 KiB.
enum { FIITED_CUDA_MAX_DIM = 2048 };

// Optimizer codes (same order as fiited::Optimizer in fiited_checks.h).
enum FiitedOptimizer { FIITED_SGD = 0, FIITED_ADAGRAD = 1, FIITED_ROWWISE_ADAGRAD = 2 };

struct FiitedLookupParams {
  const float* __restrict weights;             // (C, chunk_size)
  const void* __restrict chunk_slots;          // (E, K) int16 or int32, -1 where pruned
  int32_t slot_index_bytes;                    // 2 (int16) or 4 (int32)
  const int64_t* __restrict entries;           // (n), validated in [0, E) by the host
  const int64_t* __restrict offsets;           // (B + 1)
  const float* __restrict per_sample_weights;  // (n) or nullptr
  float* __restrict out;                       // (B, K * chunk_size), rows out_stride apart
  int64_t out_stride;
  int64_t num_bags;                            // B
  int64_t num_entries;                         // E
  int64_t capacity;                            // C
  int32_t num_chunks;                          // K
  int32_t chunk_size;
  int32_t mean;                                // divide each non-empty bag by its length
  // Table-batched lookups: bag b is row b % bags_per_feature of feature b / bags_per_feature,
  // written at column feature_cols[f] and divided where feature_mean[f]; nullptr: column 0, `mean`.
  const int64_t* __restrict feature_cols;      // (F) or nullptr
  const bool* __restrict feature_mean;         // (F) or nullptr
  int64_t bags_per_feature;
};

struct FiitedBackwardParams {
  const float* __restrict grad_rows;        // (R, D)
  const int64_t* __restrict row_of_id;      // (n), validated in [0, R) by the host
  const float* __restrict id_scale;         // (n) or nullptr
  const int64_t* __restrict sorted_ids;     // (n) ids ordered by entry (stable)
  const int64_t* __restrict unique_entries; // (U) ascending
  const int64_t* __restrict segment_starts; // (U + 1) sorted position of each entry's first id
  const void* __restrict chunk_slots;       // (E, K) int16 or int32
  int32_t slot_index_bytes;                 // 2 (int16) or 4 (int32)
  float* __restrict utilities;              // (E, K), stored against the table's base step
  float* __restrict miss_utilities;         // (G, K) or nullptr: entries E + g, as of now
  float* __restrict weights;                // (C, chunk_size)
  float* __restrict momentum;               // (C, chunk_size) | (C) | (0)
  int64_t num_unique;                       // U
  int64_t num_entries;                      // E
  int64_t capacity;                         // C
  int32_t num_chunks;                       // K
  int32_t chunk_size;
  int32_t optimizer;                        // FiitedOptimizer
  int32_t grad_access;                      // utility "grad_access" (1) or "access" (0)
  float lr;
  float eps;
  float weight_decay;
  float utility_scale;                      // decay^(base - step)
};

// Pooled lookup on `stream`; returns the launch error (cudaSuccess when B == 0).
cudaError_t fiited_lookup_forward_cuda(const FiitedLookupParams* params, cudaStream_t stream);

// Per-unique-entry coalesce + utility + optimizer update on `stream`; cudaSuccess when U == 0.
cudaError_t fiited_fused_backward_cuda(const FiitedBackwardParams* params, cudaStream_t stream);

}  // extern "C"
