// CPU kernel and schema of fiited::counter_uniform_grid: the counter-based uniforms that
// (re)initialise chunks (store/vhpi.py init_values), bitwise store.layout.counter_uniform.
//
// counter_uniform folds its keys one by one, x = mix64((x ^ key) + golden), and returns the top
// 24 bits of x as a float in [0, 1). In PyTorch each fold over an (n, w) grid is ~10 int64 ops
// with a temporary each; on 2 cores that cost 19 ms of a 57 ms training step while a budget-0.25
// table fills (bench_app_step, D=32). Here the folds of one value run in registers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fiited_hash.h"

TORCH_LIBRARY_FRAGMENT(fiited, m) {
  // counter_uniform's folds continued from a per-row state: row i's state is prefix[i] (the
  // head keys already folded, store.layout.counter_state), then rows[i], cols[i, j], *tail:
  //   prefix int64 (n);  rows int64 (n);  cols int64 (n, w);  tail: scalar keys (int64)
  //   returns fp32 (n, w) in [0, 1)
  m.def("counter_uniform_grid(Tensor prefix, Tensor rows, Tensor cols, int[] tail) -> Tensor");
}

namespace fiited {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int64_t kGrain = 1 << 14;  // values per task

inline uint64_t fold(uint64_t x, uint64_t key) { return fiited_mix64((x ^ key) + kGolden); }

at::Tensor counter_uniform_grid_cpu(
    const at::Tensor& prefix, const at::Tensor& rows, const at::Tensor& cols,
    c10::IntArrayRef tail) {
  constexpr const char* op = "fiited::counter_uniform_grid";
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "[torchrec_fiited] ", op,
              ": rows must be a 1-D int64 tensor, got ", rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.dim() == 2 && cols.size(0) == rows.size(0),
              "[torchrec_fiited] ", op, ": cols must be an int64 (n=", rows.size(0),
              ", w) tensor, got ", cols.scalar_type(), " ", cols.sizes());
  TORCH_CHECK(prefix.scalar_type() == at::kLong && prefix.dim() == 1 &&
                  prefix.size(0) == rows.size(0),
              "[torchrec_fiited] ", op, ": prefix must be an int64 (n=", rows.size(0),
              ") tensor, got ", prefix.scalar_type(), " ", prefix.sizes());
  const auto pre = prefix.contiguous(), r = rows.contiguous(), c = cols.contiguous();
  const int64_t n = c.size(0), w = c.size(1);
  auto out = at::empty({n, w}, rows.options().dtype(at::kFloat));
  const std::vector<int64_t> tail_keys(tail.begin(), tail.end());
  const int64_t* pp = pre.data_ptr<int64_t>();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, kGrain / std::max<int64_t>(w, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t xr = fold(static_cast<uint64_t>(pp[i]), static_cast<uint64_t>(rp[i]));
      for (int64_t j = 0; j < w; ++j) {
        uint64_t x = fold(xr, static_cast<uint64_t>(cp[i * w + j]));
        for (const int64_t key : tail_keys) x = fold(x, static_cast<uint64_t>(key));
        // The top 24 bits: every fp32 in [0, 1) on a 2^-24 grid, never 1.0.
        op_[i * w + j] = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CPU, m) {
  m.impl("counter_uniform_grid", &fiited::counter_uniform_grid_cpu);
}
