// Building blocks of the CPU kernels: explicit SIMD vectors, compile-time shapes, a cost-balanced
// parallel loop, prefetch and cold failure paths.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fiited {

// Below this many ids (plus bags / entries) per thread, the fork/join costs more than it saves.
constexpr int64_t kMinWorkPerTask = 4096;

// ---- vectors --------------------------------------------------------------------------------
// W floats as one value: GCC/Clang vector extensions, lowered to AVX-512/AVX2/SSE by -march.
// Written out because GCC left the per-chunk loops scalar (vmovss + vfmadd213ss per float)
// when they went through memory; W = 1 is a plain float, for shapes known only at run time.

template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * W)));
};
template <>
struct VecOf<1> {
  using type = float;
};
template <int W>
using Vec = typename VecOf<W>::type;

template <int W>
inline Vec<W> vload(const float* p) {
  Vec<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
inline void vstore(float* p, const Vec<W>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// x - (+0) is x for every x (also -0, unlike x + 0), so the compiler emits a plain broadcast.
template <int W>
inline Vec<W> splat(float x) {
  return x - Vec<W>{};
}

template <int W>
inline float hsum(const Vec<W>& v) {
  if constexpr (W == 1) {
    return v;
  } else {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
}

template <int W>
inline float lane(const Vec<W>& v, int64_t l) {
  if constexpr (W == 1) {
    return v;
  } else {
    return v[l];
  }
}

// ---- shapes ---------------------------------------------------------------------------------

// K chunks of cs floats known at compile time, handled as cs / W vectors of W floats each;
// Shape<0, 0> reads K and chunk_size at run time and works on single floats.
template <int kK, int kCs>
struct Shape {
  static constexpr int K = kK;
  static constexpr int cs = kCs;
  static constexpr int D = kK * kCs;
  static constexpr int W = kCs >= 8 ? 8 : (kCs > 0 ? kCs : 1);
};

template <int kK, int... kDs, typename Fn>
bool dispatch_dims(int64_t K, int64_t D, Fn& fn) {
  return K == kK && ((D == kDs && (fn(Shape<kK, kDs / kK>{}), true)) || ...);
}

// Calls fn(Shape<K, D / K>) for K in {1, 2, 4, 8} and D in {16, ..., 256}, so that the per-id
// loops unroll and the accumulators stay in registers, and fn(Shape<0, 0>) for other sizes.
template <typename Fn>
void dispatch_shape(int64_t K, int64_t chunk_size, Fn&& fn) {
  const int64_t D = K * chunk_size;
  const bool done = dispatch_dims<1, 16, 32, 64, 128, 256>(K, D, fn) ||
      dispatch_dims<2, 16, 32, 64, 128, 256>(K, D, fn) ||
      dispatch_dims<4, 16, 32, 64, 128, 256>(K, D, fn) ||
      dispatch_dims<8, 16, 32, 64, 128, 256>(K, D, fn);
  if (!done) fn(Shape<0, 0>{});
}

// D floats as D / W vectors: a fixed array (registers) for a compile-time shape, else a vector.
template <typename S, bool kFixed = (S::D > 0)>
struct Accumulator {
  std::array<Vec<S::W>, S::D / S::W> v;
  explicit Accumulator(int64_t) {}
  Vec<S::W>& operator[](int64_t j) { return v[j]; }
  void zero() { v.fill(Vec<S::W>{}); }
};

template <typename S>
struct Accumulator<S, false> {
  std::vector<float> v;
  explicit Accumulator(int64_t D) : v(D) {}
  float& operator[](int64_t j) { return v[j]; }
  void zero() { std::fill(v.begin(), v.end(), 0.f); }
};

// ---- parallel loop --------------------------------------------------------------------------

// Runs fn(begin, end) over pieces of [0, count) of about equal cost in parallel, where the cost
// of items [0, i) is work_before(i) + i (work_before: non-decreasing, e.g. offsets[i]). Zipf ids
// make some bags and entries far heavier than others, so an even split by count would not do.
template <typename WorkBefore, typename Fn>
void parallel_balanced(int64_t count, const WorkBefore& work_before, const Fn& fn) {
  if (count <= 0) return;
  const int64_t total = work_before(count) + count;
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinWorkPerTask));
  auto boundary = [&](int64_t t) {  // first item whose preceding cost reaches t / tasks
    const int64_t target = total * t / tasks;
    int64_t lo = 0, hi = count;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work_before(mid) + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) fn(boundary(t), boundary(t + 1));
  });
}

// ---- memory hints and failures --------------------------------------------------------------
// The prefetch helpers (and their callers in fiited_cpu.cpp) must be always_inline: a prefetch
// has no side effects, so once GCC's IPA marks an out-of-line helper "pure", it deletes the call
// and every prefetch with it. Seen with GCC 12: no prefetch instruction was left in the library,
// and restoring them took the K=4 forward from 8 to 32 M lookups/s (one thread, L=20).

C10_ALWAYS_INLINE void prefetch_read(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

C10_ALWAYS_INLINE void prefetch_write(const void* p) {
  __builtin_prefetch(p, 1, 3);
}

// Prefetches the cs floats of a chunk, one 64-byte line at a time.
C10_ALWAYS_INLINE void prefetch_chunk(const float* chunk, int64_t cs, bool for_write) {
  for (int64_t c = 0; c < cs; c += 16) {
    if (for_write) prefetch_write(chunk + c); else prefetch_read(chunk + c);
  }
}

// Out of line so that the range checks in the hot loops stay one compare and a branch.
[[noreturn]] C10_NOINLINE inline void fail_out_of_range(
    const char* op, const char* name, int64_t i, int64_t value, int64_t hi, const char* hi_name) {
  TORCH_CHECK(
      false, "[torchrec_fiited] ", op, ": ", name, "[", i, "] must be in [0, ", hi_name, "=", hi,
      "), got ", value);
}

[[noreturn]] C10_NOINLINE inline void fail_corrupted_slot(const char* op, int64_t slot,
                                                          int64_t capacity) {
  TORCH_CHECK(
      false, "[torchrec_fiited] ", op, ": chunk_slots holds slot ", slot,
      " outside the pool's [0, C=", capacity, "); the store is corrupted");
}

inline bool outside(int64_t value, int64_t hi) {
  return static_cast<uint64_t>(value) >= static_cast<uint64_t>(hi);
}

}  // namespace fiited
