// CPU kernels and schemas of the utility sketch ops (torchrec_fiited/store/sketch.py; the
// PyTorch reference and the contract are ops/reference.py's sketch_estimate / sketch_raise).
//
// The sketch is bf16 counts (depth, width, K), every value stored rounded up to bf16 (ceil_bf16:
// an estimate never falls below the truth); a key's cell in row r is
// mix64(key ^ salts[r]) mod width, the mix as Python's store.layout._mix64 (splitmix64's
// finalizer) and the mod as torch.remainder (non-negative). Estimates read the minimum over the
// rows; a raise first computes every key's target from the counts as they were (so keys that
// share a cell in one call do not see each other), then raises each row's cells to the largest
// target, one task per row: the result is the same for any order and thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fiited_cpu_utils.h"
#include "fiited_hash.h"

TORCH_LIBRARY_FRAGMENT(fiited, m) {
  // Over-estimated utility of each key: min over the rows of its cells.
  //   counts  bf16 (depth, width, K), width > 0;  keys int64 (n);  salts: depth ints
  //   returns fp32 (n, K)
  m.def("sketch_estimate(Tensor counts, Tensor keys, int[] salts) -> Tensor");
  // Raise each key's cells (every row) to at least its target: estimate + values when `add`
  // (conservative update), values otherwise, rounded up to bf16. values fp32 (n, K), >= 0.
  m.def("sketch_raise(Tensor(a!) counts, Tensor keys, Tensor values, bool add, int[] salts) -> ()");
}

namespace fiited {
namespace {

struct SketchView {
  c10::BFloat16* counts;
  int64_t depth, width, K;
};

SketchView check_sketch(const char* op, const at::Tensor& counts, const at::Tensor& keys,
                        c10::IntArrayRef salts) {
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kBFloat16
                  && counts.dim() == 3 && counts.is_contiguous(),
              "[torchrec_fiited] ", op, ": counts must be a contiguous 3-D bf16 CPU tensor, got ",
              counts.scalar_type(), " of shape ", counts.sizes());
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == at::kLong && keys.dim() == 1,
              "[torchrec_fiited] ", op, ": keys must be a 1-D int64 CPU tensor, got ",
              keys.scalar_type(), " of shape ", keys.sizes());
  TORCH_CHECK(counts.size(1) > 0, "[torchrec_fiited] ", op, ": the sketch has no cells");
  TORCH_CHECK(static_cast<int64_t>(salts.size()) == counts.size(0), "[torchrec_fiited] ", op,
              ": one salt per row, got ", salts.size(), " salts for ", counts.size(0), " rows");
  return {counts.data_ptr<c10::BFloat16>(), counts.size(0), counts.size(1), counts.size(2)};
}

// The smallest bf16 >= x (x >= 0, not NaN), as store/sketch.py's ceil_bf16.
inline c10::BFloat16 ceil_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + 0xFFFFu) & 0xFFFF0000u;
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// x mod width in [0, width) for int64 x (torch.remainder), without a 64-bit division per key:
// Lemire's fastmod (M = ceil(2^128 / width)) on x as uint64, then the wrap of a negative x
// (x = u - 2^64) undone with 2^64 mod width. The idiv was most of sketch_raise's time.
class Remainder {
 public:
  explicit Remainder(int64_t width)
      : d_(static_cast<uint64_t>(width)),
        m_(~__uint128_t{0} / d_ + 1),
        wrap_((0 - d_) % d_) {}

  int64_t operator()(int64_t x) const {
    const __uint128_t low = m_ * static_cast<uint64_t>(x);
    const __uint128_t high = ((low & ~uint64_t{0}) * d_ >> 64) + (low >> 64) * d_;
    const uint64_t r = static_cast<uint64_t>(high >> 64);  // uint64(x) mod d
    if (x >= 0) return static_cast<int64_t>(r);
    return static_cast<int64_t>(r >= wrap_ ? r - wrap_ : r + d_ - wrap_);
  }

 private:
  uint64_t d_;
  __uint128_t m_;
  uint64_t wrap_;
};

// cells (depth, n): the cell of each key in each row, computed once per call.
std::vector<int64_t> cells_of(const SketchView& s, const int64_t* keys, int64_t n,
                              c10::IntArrayRef salts) {
  std::vector<int64_t> cells(s.depth * n);
  const Remainder mod(s.width);
  at::parallel_for(0, n, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < s.depth; ++r) {
      for (int64_t i = begin; i < end; ++i) {
        cells[r * n + i] = mod(static_cast<int64_t>(
            fiited_mix64(static_cast<uint64_t>(keys[i] ^ salts[r]))));
      }
    }
  });
  return cells;
}

// out (n, K) = min over the rows of the keys' cells.
void estimate_into(const SketchView& s, const std::vector<int64_t>& cells, int64_t n,
                   float* out) {
  at::parallel_for(0, n, kMinWorkPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = out + i * s.K;
      for (int64_t r = 0; r < s.depth; ++r) {
        const c10::BFloat16* c = s.counts + (r * s.width + cells[r * n + i]) * s.K;
        for (int64_t k = 0; k < s.K; ++k) {
          const float v = static_cast<float>(c[k]);
          o[k] = r == 0 ? v : std::min(o[k], v);
        }
      }
    }
  });
}

at::Tensor sketch_estimate_cpu(const at::Tensor& counts, const at::Tensor& keys,
                               c10::IntArrayRef salts) {
  const SketchView s = check_sketch("fiited::sketch_estimate", counts, keys, salts);
  const auto k = keys.contiguous();
  const int64_t n = k.numel();
  auto out = at::empty({n, s.K}, counts.options().dtype(at::kFloat));
  estimate_into(s, cells_of(s, k.data_ptr<int64_t>(), n, salts), n, out.data_ptr<float>());
  return out;
}

void sketch_raise_cpu(at::Tensor& counts, const at::Tensor& keys, const at::Tensor& values,
                      bool add, c10::IntArrayRef salts) {
  constexpr const char* op = "fiited::sketch_raise";
  const SketchView s = check_sketch(op, counts, keys, salts);
  const int64_t n = keys.numel();
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 2
                  && values.size(0) == n && values.size(1) == s.K,
              "[torchrec_fiited] ", op, ": values must be fp32 (n=", n, ", K=", s.K, "), got ",
              values.scalar_type(), " of shape ", values.sizes());
  if (n == 0) return;
  const auto k = keys.contiguous();
  const std::vector<int64_t> cells = cells_of(s, k.data_ptr<int64_t>(), n, salts);
  at::Tensor target = values.contiguous();
  if (add) {
    auto est = at::empty({n, s.K}, counts.options().dtype(at::kFloat));
    estimate_into(s, cells, n, est.data_ptr<float>());
    target = est.add_(target);  // fp32 est + value, as the reference
  }
  const float* t = target.data_ptr<float>();
  // One task per row: rows own disjoint cells.
  at::parallel_for(0, s.depth, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      c10::BFloat16* row = s.counts + r * s.width * s.K;
      for (int64_t i = 0; i < n; ++i) {
        c10::BFloat16* c = row + cells[r * n + i] * s.K;
        for (int64_t j = 0; j < s.K; ++j) {
          const c10::BFloat16 v = ceil_bf16(t[i * s.K + j]);
          if (static_cast<float>(v) > static_cast<float>(c[j])) c[j] = v;
        }
      }
    }
  });
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CPU, m) {
  m.impl("sketch_estimate", &fiited::sketch_estimate_cpu);
  m.impl("sketch_raise", &fiited::sketch_raise_cpu);
}
