// Input validation at the boundary of the FIITED ops, shared by the CPU and CUDA hosts so that both
// backends reject the same inputs with the same messages. Every message names the op, the
// argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "fiited_hash.h"

namespace fiited {

enum class Optimizer { kSgd, kAdagrad, kRowwiseAdagrad };

// Sizes of one lookup_forward call, after validation.
struct LookupSizes {
  int64_t capacity;    // C, pool slots
  int64_t chunk_size;  // floats per chunk
  int64_t num_entries; // E
  int64_t num_chunks;  // K
  int64_t num_ids;     // n
  int64_t num_bags;    // B
};

// Sizes of one fused_backward call, after validation.
struct BackwardSizes {
  int64_t capacity;
  int64_t chunk_size;
  int64_t num_entries;
  int64_t num_chunks;
  int64_t num_ids;
  int64_t num_rows;  // R, rows of grad_rows
  int64_t num_miss_groups;  // G, rows of miss_utilities (0 without)
  Optimizer optimizer;
  bool grad_access;  // utility == "grad_access" (else "access")
};

inline void check_tensor(
    const char* op,
    const char* name,
    const at::Tensor& t,
    at::ScalarType dtype,
    int64_t dim,
    const at::Device& device) {
  TORCH_CHECK(
      t.scalar_type() == dtype && t.dim() == dim && t.device() == device,
      "[torchrec_fiited] ", op, ": ", name, " must be a ", dim, "-D ", dtype, " tensor on ",
      device, ", got a ", t.dim(), "-D ", t.scalar_type(), " tensor on ", t.device());
}

// chunk_slots: int16 in a pool of at most 2^15 slots (store/layout.py's slot_dtype), int32 above.
inline void check_slots_tensor(const char* op, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(
      (t.scalar_type() == at::kShort || t.scalar_type() == at::kInt) && t.dim() == 2
          && t.device() == device,
      "[torchrec_fiited] ", op, ": chunk_slots must be a 2-D Short or Int tensor on ", device,
      ", got a ", t.dim(), "-D ", t.scalar_type(), " tensor on ", t.device());
}

inline void check_size(
    const char* op,
    const char* name,
    const at::Tensor& t,
    int64_t d,
    int64_t want,
    const char* why) {
  TORCH_CHECK(
      t.size(d) == want, "[torchrec_fiited] ", op, ": ", name, ".size(", d, ") must be ", want,
      " (", why, "), got ", t.size(d), " (shape ", t.sizes(), ")");
}

// An int64 (n) output buffer the caller reuses (the *_out ops).
inline void check_long_out(const char* op, const char* name, const at::Tensor& out, int64_t n,
                           const at::Device& device) {
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 1 && out.numel() == n &&
                  out.is_contiguous() && out.device() == device,
              "[torchrec_fiited] ", op, ": ", name, " must be a contiguous int64 (", n,
              ") tensor on ", device, ", got ", out.scalar_type(), " ", out.sizes(), " on ",
              out.device());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(
      t.is_contiguous(), "[torchrec_fiited] ", op, ": ", name,
      " is updated in place and must be contiguous, got strides ", t.strides(),
      " for shape ", t.sizes());
}

inline LookupSizes check_lookup_inputs(
    const at::Tensor& weights,              // (C, chunk_size)
    const at::Tensor& chunk_slots,          // (E, K)
    const at::Tensor& entries,              // (n)
    const at::Tensor& offsets,              // (B + 1)
    const std::optional<at::Tensor>& psw) { // (n) or None
  constexpr const char* op = "fiited::lookup_forward";
  const auto device = weights.device();
  check_tensor(op, "weights", weights, at::kFloat, 2, device);
  check_slots_tensor(op, chunk_slots, device);
  check_tensor(op, "entries", entries, at::kLong, 1, device);
  check_tensor(op, "offsets", offsets, at::kLong, 1, device);
  TORCH_CHECK(
      offsets.numel() >= 1, "[torchrec_fiited] ", op,
      ": offsets must hold B + 1 >= 1 bag boundaries, got an empty tensor");
  if (psw.has_value()) {
    check_tensor(op, "per_sample_weights", *psw, at::kFloat, 1, device);
    check_size(op, "per_sample_weights", *psw, 0, entries.numel(), "one weight per entry");
  }
  return {weights.size(0), weights.size(1), chunk_slots.size(0), chunk_slots.size(1),
          entries.numel(), offsets.numel() - 1};
}

// `out` of lookup_forward_out: (B, K * chunk_size) fp32 rows with unit column stride.
inline void check_lookup_out(
    const at::Tensor& out, const LookupSizes& s, const at::Device& device) {
  constexpr const char* op = "fiited::lookup_forward_out";
  check_tensor(op, "out", out, at::kFloat, 2, device);
  check_size(op, "out", out, 0, s.num_bags, "B = offsets.numel() - 1");
  check_size(op, "out", out, 1, s.num_chunks * s.chunk_size, "D = K * chunk_size");
  TORCH_CHECK(
      out.size(1) <= 1 || out.stride(1) == 1, "[torchrec_fiited] ", op,
      ": out must have unit column stride (rows may be strided), got strides ", out.strides());
}

// Each feature's block [feature_cols[f], feature_cols[f] + D) inside out's W columns. Reads the
// F values on the host (one copy when they are on a GPU).
inline void check_feature_cols(const at::Tensor& feature_cols, int64_t D, int64_t W) {
  const auto host = feature_cols.cpu();
  const int64_t* c = host.data_ptr<int64_t>();
  for (int64_t f = 0; f < host.numel(); ++f) {
    TORCH_CHECK(
        c[f] >= 0 && c[f] + D <= W, "[torchrec_fiited] fiited::lookup_forward_batched_out: ",
        "feature_cols[", f, "]=", c[f], " puts a block of D=", D, " columns outside out's ", W,
        " columns");
  }
}

// `out`, `feature_cols` and `feature_mean` of lookup_forward_batched_out: F = feature_cols.numel()
// features of B bags each (offsets hold F * B + 1 boundaries), feature f written at columns
// [feature_cols[f], feature_cols[f] + D) of `out` (B, W), D = K * chunk_size. The column check
// (``check_feature_cols``) reads feature_cols on the host unless `cols_on_host` is false (the
// CUDA host decides it on the device, with its other bounds, in one transfer).
inline void check_batched_out(
    const at::Tensor& out,
    const at::Tensor& feature_cols,
    const at::Tensor& feature_mean,
    const LookupSizes& s,
    const at::Device& device,
    bool cols_on_host = true) {
  constexpr const char* op = "fiited::lookup_forward_batched_out";
  check_tensor(op, "feature_cols", feature_cols, at::kLong, 1, device);
  check_tensor(op, "feature_mean", feature_mean, at::kBool, 1, device);
  const int64_t F = feature_cols.numel();
  TORCH_CHECK(F >= 1, "[torchrec_fiited] ", op, ": feature_cols must name >= 1 feature, got none");
  check_size(op, "feature_mean", feature_mean, 0, F, "one flag per feature");
  TORCH_CHECK(
      s.num_bags % F == 0, "[torchrec_fiited] ", op, ": offsets must hold F * B + 1 boundaries ",
      "for F=", F, " features, got ", s.num_bags + 1);
  check_tensor(op, "out", out, at::kFloat, 2, device);
  check_size(op, "out", out, 0, s.num_bags / F, "B = (offsets.numel() - 1) / F");
  TORCH_CHECK(
      out.size(1) <= 1 || out.stride(1) == 1, "[torchrec_fiited] ", op,
      ": out must have unit column stride (rows may be strided), got strides ", out.strides());
  if (cols_on_host) check_feature_cols(feature_cols, s.num_chunks * s.chunk_size, out.size(1));
}

inline Optimizer parse_optimizer(std::string_view optimizer) {
  if (optimizer == "sgd") return Optimizer::kSgd;
  if (optimizer == "adagrad") return Optimizer::kAdagrad;
  TORCH_CHECK(
      optimizer == "rowwise_adagrad", "[torchrec_fiited] fiited::fused_backward: optimizer must ",
      "be one of sgd, adagrad, rowwise_adagrad, got '", optimizer, "'");
  return Optimizer::kRowwiseAdagrad;
}

inline bool parse_grad_access(std::string_view utility) {
  TORCH_CHECK(
      utility == "grad_access" || utility == "access", "[torchrec_fiited] fiited::fused_backward: ",
      "utility must be one of grad_access, access, got '", utility, "'");
  return utility == "grad_access";
}

inline void check_momentum(const at::Tensor& momentum, Optimizer opt, int64_t C, int64_t cs) {
  constexpr const char* op = "fiited::fused_backward";
  const bool ok = opt == Optimizer::kSgd ? momentum.dim() == 1 && momentum.size(0) == 0
      : opt == Optimizer::kAdagrad       ? momentum.dim() == 2 && momentum.size(0) == C &&
                                           momentum.size(1) == cs
                                         : momentum.dim() == 1 && momentum.size(0) == C;
  TORCH_CHECK(
      ok, "[torchrec_fiited] ", op, ": momentum must have shape ",
      opt == Optimizer::kSgd ? "(0) for sgd" : opt == Optimizer::kAdagrad
          ? "(C, chunk_size) for adagrad" : "(C) for rowwise_adagrad",
      " with C=", C, ", chunk_size=", cs, ", got ", momentum.sizes());
  check_contiguous(op, "momentum", momentum);
}

inline BackwardSizes check_backward_inputs(
    const at::Tensor& grad_rows,   // (R, D)
    const at::Tensor& row_of_id,   // (n)
    const std::optional<at::Tensor>& id_scale,  // (n) or None
    const at::Tensor& entries,     // (n)
    const at::Tensor& chunk_slots, // (E, K)
    const at::Tensor& utilities,   // (E, K)
    const at::Tensor& weights,     // (C, chunk_size)
    const at::Tensor& momentum,    // (C, chunk_size) | (C) | (0)
    std::string_view optimizer,
    std::string_view utility,
    double utility_scale,
    const std::optional<at::Tensor>& miss_utilities) {  // (G, K) or None
  constexpr const char* op = "fiited::fused_backward";
  const auto device = weights.device();
  check_tensor(op, "grad_rows", grad_rows, at::kFloat, 2, device);
  check_tensor(op, "row_of_id", row_of_id, at::kLong, 1, device);
  check_tensor(op, "entries", entries, at::kLong, 1, device);
  check_slots_tensor(op, chunk_slots, device);
  check_tensor(op, "utilities", utilities, at::kFloat, 2, device);
  check_tensor(op, "weights", weights, at::kFloat, 2, device);
  check_tensor(op, "momentum", momentum, at::kFloat, momentum.dim() == 2 ? 2 : 1, device);
  const int64_t n = entries.numel(), E = chunk_slots.size(0), K = chunk_slots.size(1);
  const int64_t C = weights.size(0), cs = weights.size(1);
  check_size(op, "row_of_id", row_of_id, 0, n, "one bag row per entry");
  if (id_scale.has_value()) {
    check_tensor(op, "id_scale", *id_scale, at::kFloat, 1, device);
    check_size(op, "id_scale", *id_scale, 0, n, "one scale per entry");
  }
  check_size(op, "grad_rows", grad_rows, 1, K * cs, "D = K * chunk_size");
  check_size(op, "utilities", utilities, 0, E, "chunk_slots.size(0)");
  check_size(op, "utilities", utilities, 1, K, "chunk_slots.size(1)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"utilities", utilities},
                                {"weights", weights}}) {
    check_contiguous(op, name, t);
  }
  int64_t G = 0;
  if (miss_utilities.has_value()) {
    check_tensor(op, "miss_utilities", *miss_utilities, at::kFloat, 2, device);
    check_size(op, "miss_utilities", *miss_utilities, 1, K, "chunk_slots.size(1)");
    check_contiguous(op, "miss_utilities", *miss_utilities);
    G = miss_utilities->size(0);
  }
  TORCH_CHECK(
      std::isfinite(static_cast<float>(utility_scale)) && utility_scale > 0, "[torchrec_fiited] ",
      op, ": utility_scale must be finite and > 0 in fp32, got ", utility_scale);
  TORCH_CHECK(
      n < std::numeric_limits<int32_t>::max(), "[torchrec_fiited] ", op,
      ": at most 2^31 - 1 entries per call, got ", n);
  const Optimizer opt = parse_optimizer(optimizer);
  check_momentum(momentum, opt, C, cs);
  return {C, cs, E, K, n, grad_rows.size(0), G, opt, parse_grad_access(utility)};
}

// A batch of hash-table keys: int64 (n) on the table's device.
inline void check_hash_keys(const char* op, const at::Tensor& keys, const at::Device& device) {
  TORCH_CHECK(
      keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.device() == device,
      "[torchrec_fiited] ", op, ": keys must be a 1-D int64 tensor on ", device, ", got a ",
      keys.dim(), "-D ", keys.scalar_type(), " tensor on ", keys.device());
}

// hash_insert's scores: fp32 (n), one per key, on the keys' device; at most 2^31 - 1 keys a call.
inline void check_insert_scores(const char* op, const at::Tensor& scores, const at::Tensor& keys) {
  const int64_t n = keys.numel();
  TORCH_CHECK(
      scores.scalar_type() == at::kFloat && scores.dim() == 1 && scores.numel() == n &&
          scores.device() == keys.device(),
      "[torchrec_fiited] ", op, ": scores must be a 1-D fp32 tensor with one score per key on ",
      keys.device(), ", got ", scores.scalar_type(), " of shape ", scores.sizes(), " on ",
      scores.device(), " for ", n, " keys");
  TORCH_CHECK(n < (int64_t{1} << 31), "[torchrec_fiited] ", op,
              ": at most 2^31 - 1 keys per call, got ", n);
}

// keys[i] is the empty-slot sentinel, which no op takes as a key.
[[noreturn]] C10_NOINLINE inline void fail_empty_key(const char* op, int64_t i) {
  TORCH_CHECK(
      false, "[torchrec_fiited] ", op, ": keys must not contain ", kFiitedEmptyKey,
      " (int64 min, the empty-slot sentinel), got it at index ", i);
}

// The resident-id hash table's two flat tensors (fiited_hash_ops.cpp) on a `device_type` device
// (the CPU or the CUDA kernels'): keys int64 (S), scores fp32 (S) when given, S = num_buckets *
// bucket_size. Returns num_buckets.
inline int64_t check_hash_table(const char* op, const at::Tensor& table_keys,
                                const at::Tensor* table_scores, int64_t bucket_size,
                                c10::DeviceType device_type) {
  const std::string device = c10::DeviceTypeName(device_type);
  TORCH_CHECK(
      table_keys.scalar_type() == at::kLong && table_keys.dim() == 1 &&
          table_keys.is_contiguous() && table_keys.device().type() == device_type,
      "[torchrec_fiited] ", op, ": table_keys must be a contiguous 1-D int64 ", device,
      " tensor, got a ", table_keys.dim(), "-D ", table_keys.scalar_type(), " tensor on ",
      table_keys.device());
  TORCH_CHECK(
      bucket_size >= 8 && bucket_size <= 128 && (bucket_size & (bucket_size - 1)) == 0,
      "[torchrec_fiited] ", op, ": bucket_size must be a power of two in [8, 128], got ",
      bucket_size);
  const int64_t S = table_keys.numel();
  TORCH_CHECK(
      S > 0 && S % bucket_size == 0 && S / bucket_size <= (int64_t{1} << 31), "[torchrec_fiited] ",
      op, ": table_keys.numel() must be num_buckets * bucket_size with 1 <= num_buckets <= 2^31, "
      "got ", S, " slots for bucket_size ", bucket_size);
  if (table_scores != nullptr) {
    const at::Tensor& s = *table_scores;
    TORCH_CHECK(
        s.scalar_type() == at::kFloat && s.dim() == 1 && s.numel() == S && s.is_contiguous() &&
            s.device() == table_keys.device(),
        "[torchrec_fiited] ", op, ": table_scores must be a contiguous fp32 tensor of shape (", S,
        ") on ", table_keys.device(), ", got ", s.scalar_type(), " of shape ", s.sizes(), " on ",
        s.device());
  }
  return S / bucket_size;
}

}  // namespace fiited
