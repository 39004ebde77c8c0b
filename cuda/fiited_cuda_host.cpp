// CUDA registration of the FIITED ops: checks, dedupe sort and launch on the current stream.
// Built only against a CUDA torch (see setup.py); the kernels are in fiited_cuda.cu,
// behind the C ABI of fiited_cuda.h.
//
// Temporaries (the sort's outputs) come from torch's CUDA caching allocator, which reuses
// blocks across steps, so they do not pay the first-touch cost they would on the CPU.

#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fiited_checks.h"
#include "fiited_cuda.h"

namespace fiited {
namespace {

static_assert(
    static_cast<int>(Optimizer::kSgd) == FIITED_SGD &&
        static_cast<int>(Optimizer::kAdagrad) == FIITED_ADAGRAD &&
        static_cast<int>(Optimizer::kRowwiseAdagrad) == FIITED_ROWWISE_ADAGRAD,
    "fiited::Optimizer and FiitedOptimizer must agree");

// Ids must index their tables before a kernel dereferences them. The bounds of a call are
// decided on the device and read back in one transfer (`all_hold`); only a failing call pays
// the further syncs that describe what failed (check_range, check_offsets, check_feature_cols).
void check_range(const char* op, const char* name, const at::Tensor& t, int64_t hi,
                 const char* hi_name, int64_t lowest = 0) {
  if (t.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(t);
  const int64_t lo = lo_t.item<int64_t>(), top = hi_t.item<int64_t>();
  TORCH_CHECK(
      lo >= lowest && top < hi, "[torchrec_fiited] ", op, ": ", name, " must be in [", lowest,
      ", ", hi_name, "=", hi, "), got values in [", lo, ", ", top, "]");
}

void check_offsets(const at::Tensor& offsets, int64_t num_ids) {
  const auto host = offsets.cpu();
  const int64_t* o = host.data_ptr<int64_t>();
  const int64_t B = host.numel() - 1;
  TORCH_CHECK(
      o[0] == 0 && o[B] <= num_ids && (B == 0 || bool(host.diff().ge(0).all().item<bool>())),
      "[torchrec_fiited] fiited::lookup_forward: offsets must start at 0, be non-decreasing and ",
      "end at most at entries.numel()=", num_ids, ", got offsets[0]=", o[0], ", offsets[-1]=",
      o[B]);
}

// 0-D bool on t's device: every value of t in [lowest, hi).
at::Tensor in_range(const at::Tensor& t, int64_t lowest, int64_t hi) {
  if (t.numel() == 0) return at::ones({}, t.options().dtype(at::kBool));
  const auto [lo, top] = at::aminmax(t);
  return lo.ge(lowest).logical_and(top.lt(hi));
}

// 0-D bool: offsets (B + 1 >= 1 values) start at 0, do not decrease, end at most at num_ids.
at::Tensor offsets_hold(const at::Tensor& offsets, int64_t num_ids) {
  auto ok = offsets[0].eq(0).logical_and(offsets[-1].le(num_ids));
  return offsets.numel() > 1 ? ok.logical_and(offsets.diff().ge(0).all()) : ok;
}

// One device-to-host transfer for every flag.
bool all_hold(const std::vector<at::Tensor>& flags) {
  return at::stack(flags).all().item<bool>();
}

// Pools into `out` (validated by the caller: (B, D) fp32 on the weights' GPU, unit column stride).
void pool_into(
    const LookupSizes& s,
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean,
    at::Tensor& out,
    const at::Tensor& feature_cols = at::Tensor(),
    const at::Tensor& feature_mean = at::Tensor()) {
  const c10::cuda::CUDAGuard guard(weights.device());
  const auto w = weights.contiguous(), slots = chunk_slots.contiguous();
  const auto ids = entries.contiguous(), offs = offsets.contiguous();
  const auto psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  std::vector<at::Tensor> flags{in_range(ids, 0, s.num_entries), offsets_hold(offs, s.num_ids)};
  const int64_t D = s.num_chunks * s.chunk_size;
  if (feature_cols.defined()) {
    flags.push_back(feature_cols.ge(0).logical_and(feature_cols.add(D).le(out.size(1))).all());
  }
  if (!all_hold(flags)) {  // raise, saying which bound failed and with what values
    check_range("fiited::lookup_forward", "entries", ids, s.num_entries, "E");
    check_offsets(offs, s.num_ids);
    if (feature_cols.defined()) check_feature_cols(feature_cols, D, out.size(1));
    TORCH_CHECK(false, "[torchrec_fiited] fiited::lookup_forward: a bound failed on the device "
                "and held on the host");
  }
  const FiitedLookupParams params{
      w.data_ptr<float>(), slots.data_ptr(), static_cast<int32_t>(slots.element_size()),
      ids.data_ptr<int64_t>(),
      offs.data_ptr<int64_t>(), psw.defined() ? psw.data_ptr<float>() : nullptr,
      out.data_ptr<float>(), out.stride(0), s.num_bags, s.num_entries, s.capacity,
      static_cast<int32_t>(s.num_chunks), static_cast<int32_t>(s.chunk_size), mean ? 1 : 0,
      feature_cols.defined() ? feature_cols.data_ptr<int64_t>() : nullptr,
      feature_mean.defined() ? feature_mean.data_ptr<bool>() : nullptr,
      feature_cols.defined() ? s.num_bags / feature_cols.numel() : std::max<int64_t>(s.num_bags, 1)};
  // The launch error is read (and cleared) by C10_CUDA_KERNEL_LAUNCH_CHECK.
  (void)fiited_lookup_forward_cuda(&params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lookup_forward_cuda(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean) {
  const LookupSizes s =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  auto out = at::empty({s.num_bags, s.num_chunks * s.chunk_size}, weights.options());
  pool_into(s, weights, chunk_slots, entries, offsets, per_sample_weights, mean, out);
  return out;
}

void lookup_forward_out_cuda(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    bool mean,
    at::Tensor& out) {
  const LookupSizes s =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  check_lookup_out(out, s, weights.device());
  pool_into(s, weights, chunk_slots, entries, offsets, per_sample_weights, mean, out);
}

void lookup_forward_batched_out_cuda(
    const at::Tensor& weights,
    const at::Tensor& chunk_slots,
    const at::Tensor& entries,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& feature_cols,
    const at::Tensor& feature_mean,
    at::Tensor& out) {
  const LookupSizes s =
      check_lookup_inputs(weights, chunk_slots, entries, offsets, per_sample_weights);
  const auto cols = feature_cols.contiguous(), means = feature_mean.contiguous();
  check_batched_out(out, cols, means, s, weights.device(), /*cols_on_host=*/false);
  pool_into(s, weights, chunk_slots, entries, offsets, per_sample_weights, false, out, cols, means);
}

void fused_backward_cuda(
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
  constexpr const char* op = "fiited::fused_backward";
  const BackwardSizes s = check_backward_inputs(
      grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, weights, momentum,
      optimizer, utility, utility_scale, miss_utilities);
  TORCH_CHECK(
      s.num_chunks * s.chunk_size <= FIITED_CUDA_MAX_DIM, "[torchrec_fiited] ", op,
      ": the CUDA kernel takes D = K * chunk_size <= ", FIITED_CUDA_MAX_DIM, ", got ",
      s.num_chunks * s.chunk_size);
  if (s.num_ids == 0) return;
  const c10::cuda::CUDAGuard guard(weights.device());
  const auto grads = grad_rows.contiguous(), rows = row_of_id.contiguous();
  const auto ids = entries.contiguous(), slots = chunk_slots.contiguous();
  const auto scale = id_scale.has_value() ? id_scale->contiguous() : at::Tensor();
  // Entries -1 (skip the id) to E + G - 1 (the miss groups), rows in [0, R), and how many ids
  // are skipped, in one transfer.
  const auto host = at::stack({in_range(ids, -1, s.num_entries + s.num_miss_groups).to(at::kLong),
                               in_range(rows, 0, s.num_rows).to(at::kLong), ids.lt(0).sum()})
                        .cpu();
  const int64_t* h = host.data_ptr<int64_t>();
  if (!(h[0] && h[1])) {
    check_range(op, "entries", ids, s.num_entries + s.num_miss_groups,
                s.num_miss_groups ? "E + G (G = miss_utilities.size(0))" : "E", /*lowest=*/-1);
    check_range(op, "row_of_id", rows, s.num_rows, "R=grad_rows.size(0)");
    TORCH_CHECK(false, "[torchrec_fiited] ", op, ": a bound failed on the device and held on the "
                "host");
  }
  // Dedupe: a stable sort keeps each entry's ids in their original order (the reference's sum).
  const auto [all_sorted, all_order] =
      at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t skipped = h[2];  // sorted first
  if (skipped == s.num_ids) return;
  const auto sorted = all_sorted.slice(0, skipped), order = all_order.slice(0, skipped);
  const auto [unique, inverse, counts] = at::unique_consecutive(sorted, false, true);
  const auto starts = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  const FiitedBackwardParams params{
      grads.data_ptr<float>(), rows.data_ptr<int64_t>(),
      scale.defined() ? scale.data_ptr<float>() : nullptr, order.data_ptr<int64_t>(),
      unique.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), slots.data_ptr(),
      static_cast<int32_t>(slots.element_size()),
      utilities.data_ptr<float>(),
      miss_utilities.has_value() ? miss_utilities->data_ptr<float>() : nullptr,
      weights.data_ptr<float>(), momentum.data_ptr<float>(), unique.numel(), s.num_entries,
      s.capacity,
      static_cast<int32_t>(s.num_chunks), static_cast<int32_t>(s.chunk_size),
      static_cast<int32_t>(s.optimizer), s.grad_access ? 1 : 0, static_cast<float>(lr),
      static_cast<float>(eps), static_cast<float>(weight_decay),
      static_cast<float>(utility_scale)};
  (void)fiited_fused_backward_cuda(&params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fiited

TORCH_LIBRARY_IMPL(fiited, CUDA, m) {
  m.impl("lookup_forward", &fiited::lookup_forward_cuda);
  m.impl("lookup_forward_out", &fiited::lookup_forward_out_cuda);
  m.impl("lookup_forward_batched_out", &fiited::lookup_forward_batched_out_cuda);
  m.impl("fused_backward", &fiited::fused_backward_cuda);
}
