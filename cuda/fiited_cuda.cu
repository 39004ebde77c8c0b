// CUDA kernels of fiited::lookup_forward and fiited::fused_backward, with C-ABI launchers.
// Compiles with nvcc alone (no torch); see fiited_cuda.h for why, and fiited_cuda_host.cpp for
// the torch-facing side (checks, dedupe sort, stream, launch check).

#include "fiited_cuda.h"

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Slot i of chunk_slots, int16 or int32 (a pool of at most 2^15 slots has int16 indices).
__device__ __forceinline__ int32_t slot_at(const void* slots, int32_t index_bytes, int64_t i) {
  return index_bytes == 2 ? int32_t{__ldg(static_cast<const int16_t*>(slots) + i)}
                          : __ldg(static_cast<const int32_t*>(slots) + i);
}

// Thread mapping: one warp per bag (blockDim = (32, kWarpsPerBlock)); lane l owns columns
// c0 + l of each 32-column tile of the bag's D = K * chunk_size outputs, so the lanes read
// consecutive floats of a chunk (coalesced). Pruned chunks are skipped without a load.
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    lookup_forward_kernel(const FiitedLookupParams p) {
  const int64_t bag = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.y;
  if (bag >= p.num_bags) return;
  const int K = p.num_chunks, cs = p.chunk_size, D = K * cs;
  const int64_t start = p.offsets[bag], end = p.offsets[bag + 1];
  const int64_t f = bag / p.bags_per_feature;
  // Division, not a multiply by 1 / length, to round as the reference does.
  const bool divide = (p.feature_mean ? p.feature_mean[f] : p.mean != 0) && end > start;
  const float length = static_cast<float>(end - start);
  float* out = p.out + (bag - f * p.bags_per_feature) * p.out_stride +
               (p.feature_cols ? p.feature_cols[f] : 0);
  for (int c0 = 0; c0 < D; c0 += kWarpSize) {
    const int c = c0 + threadIdx.x;
    if (c >= D) break;
    const int k = c / cs, col = c - k * cs;
    float acc = 0.f;
    for (int64_t i = start; i < end; ++i) {
      const int64_t e = __ldg(p.entries + i);
      const int32_t s = slot_at(p.chunk_slots, p.slot_index_bytes, e * K + k);
      if (s < 0 || s >= p.capacity) continue;
      const float w = p.per_sample_weights ? __ldg(p.per_sample_weights + i) : 1.f;
      acc += w * __ldg(p.weights + int64_t{s} * cs + col);
    }
    out[c] = divide ? acc / length : acc;
  }
}

// One optimizer step on the live chunk at `slot`; g points at this chunk's gradient in shared
// memory. Lanes stride the chunk's columns; the rowwise state is reduced across the warp.
__device__ void apply_optimizer(const FiitedBackwardParams& p, int64_t slot, const float* g) {
  const int cs = p.chunk_size, lane = threadIdx.x;
  float* w = p.weights + slot * cs;
  if (p.optimizer == FIITED_ROWWISE_ADAGRAD) {
    float sq = 0.f;
    for (int c = lane; c < cs; c += kWarpSize) {
      const float gc = g[c] + p.weight_decay * w[c];
      sq += gc * gc;
    }
    const float state = p.momentum[slot] + warp_sum(sq) / static_cast<float>(cs);
    __syncwarp();
    if (lane == 0) p.momentum[slot] = state;
    const float step_size = p.lr / (sqrtf(state) + p.eps);
    for (int c = lane; c < cs; c += kWarpSize) w[c] -= step_size * (g[c] + p.weight_decay * w[c]);
  } else if (p.optimizer == FIITED_ADAGRAD) {
    float* m = p.momentum + slot * cs;
    for (int c = lane; c < cs; c += kWarpSize) {
      const float gc = g[c] + p.weight_decay * w[c];
      m[c] += gc * gc;
      w[c] -= p.lr * gc / (sqrtf(m[c]) + p.eps);
    }
  } else {
    for (int c = lane; c < cs; c += kWarpSize) w[c] -= p.lr * (g[c] + p.weight_decay * w[c]);
  }
}

// Thread mapping: one warp per unique entry (blockDim = (32, kWarpsPerBlock)); each warp keeps
// its entry's coalesced gradient (D floats) in shared memory. Entries are distinct and so are
// their live slots, so warps never write the same memory.
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    fused_backward_kernel(const FiitedBackwardParams p) {
  extern __shared__ float smem[];  // (kWarpsPerBlock, D)
  const int64_t u = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.y;
  if (u >= p.num_unique) return;  // the whole warp leaves together
  const int K = p.num_chunks, cs = p.chunk_size, D = K * cs, lane = threadIdx.x;
  float* acc = smem + threadIdx.y * D;
  const int64_t first = p.segment_starts[u], last = p.segment_starts[u + 1];

  /* Step 1: coalesce the entry's id gradients, in id order like the reference. */
  for (int c = lane; c < D; c += kWarpSize) {
    float sum = 0.f;
    for (int64_t j = first; j < last; ++j) {
      const int64_t i = p.sorted_ids[j];
      const float scale = p.id_scale ? p.id_scale[i] : 1.f;
      sum += p.grad_rows[p.row_of_id[i] * D + c] * scale;
    }
    acc[c] = sum;
  }
  __syncwarp();

  /* Step 2: u += accesses * (||g_k|| or 1) * utility_scale for every chunk; a miss group
     (e >= E) earns into miss_utilities, unscaled, and stops there (it holds no chunk). */
  const int64_t e = p.unique_entries[u];
  const bool miss = e >= p.num_entries;
  float* const target = miss ? p.miss_utilities + (e - p.num_entries) * K : p.utilities + e * K;
  const float scale = miss ? 1.f : p.utility_scale;
  const float accesses = static_cast<float>(last - first);
  for (int k = 0; k < K; ++k) {
    float sq = 0.f;
    for (int c = lane; c < cs; c += kWarpSize) sq += acc[k * cs + c] * acc[k * cs + c];
    sq = warp_sum(sq);
    const float gain = p.grad_access ? sqrtf(sq) : 1.f;
    const float add = accesses * gain * scale;
    if (lane == 0) target[k] += add;
  }
  if (miss) return;  // warp-uniform

  /* Step 3: the optimizer on live chunks only (warp-uniform branch on the slot). */
  for (int k = 0; k < K; ++k) {
    const int32_t s = slot_at(p.chunk_slots, p.slot_index_bytes, e * K + k);
    if (s < 0 || s >= p.capacity) continue;
    apply_optimizer(p, s, acc + k * cs);
  }
}

int64_t num_blocks(int64_t items) {
  return (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

}  // namespace

extern "C" cudaError_t fiited_lookup_forward_cuda(
    const FiitedLookupParams* params, cudaStream_t stream) {
  if (params->num_bags == 0) return cudaSuccess;
  const dim3 block(kWarpSize, kWarpsPerBlock);
  lookup_forward_kernel<<<num_blocks(params->num_bags), block, 0, stream>>>(*params);
  // Peek, not get: the caller's C10_CUDA_KERNEL_LAUNCH_CHECK reads (and clears) the error.
  return cudaPeekAtLastError();
}

extern "C" cudaError_t fiited_fused_backward_cuda(
    const FiitedBackwardParams* params, cudaStream_t stream) {
  if (params->num_unique == 0) return cudaSuccess;
  const int D = params->num_chunks * params->chunk_size;
  if (D > FIITED_CUDA_MAX_DIM) return cudaErrorInvalidValue;
  const dim3 block(kWarpSize, kWarpsPerBlock);
  const size_t smem = sizeof(float) * kWarpsPerBlock * D;
  fused_backward_kernel<<<num_blocks(params->num_unique), block, smem, stream>>>(*params);
  return cudaPeekAtLastError();
}
