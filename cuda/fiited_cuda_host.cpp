// CUDA registration of the FIITED ops: checks, dedupe sort and launch on the current stream.
// Built only against a CUDA torch (see setup.py); the kernels are in fiited_cuda.cu,
// behind the C ABI of fiited_cuda.h.
//
// Temporaries (the sort's outputs) come from torch's CUDA caching allocator, which reuses
// blocks across steps, so they do not pay the first-touch cost they would on the CPU.

#include <algorithm>

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

// Ids must index their tables before a kernel dereferences them. One device sync per checked
// tensor; FBGEMM's TBE pays the same in its bounds check.
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
  check_range("fiited::lookup_forward", "entries", ids, s.num_entries, "E");
  check_offsets(offs, s.num_ids);
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
  check_batched_out(out, cols, means, s, weights.device());
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
  // -1: skip the id; E .. E + G - 1: the miss groups
  check_range(op, "entries", ids, s.num_entries + s.num_miss_groups,
              s.num_miss_groups ? "E + G (G = miss_utilities.size(0))" : "E", /*lowest=*/-1);
  check_range(op, "row_of_id", rows, s.num_rows, "R=grad_rows.size(0)");
  // Dedupe: a stable sort keeps each entry's ids in their original order (the reference's sum).
  const auto [all_sorted, all_order] =
      at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t skipped = ids.lt(0).sum().item<int64_t>();  // sorted first
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
