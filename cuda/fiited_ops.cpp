// Schemas of the FIITED ops: one definition, implementations per backend live beside it
// (fiited_cpu.cpp, fiited_cuda.cu + fiited_cuda_host.cpp). The fake (meta) impls are the Python
// functions in torchrec_fiited/ops/native.py, which set_python_module points torch at.
//
// Terms (entry, chunk_slots, slot, chunk_size, K) are defined in torchrec_fiited/store/layout.py;
// the semantics are those of torchrec_fiited/ops/reference.py.

#include <torch/library.h>

TORCH_LIBRARY(fiited, m) {
  m.set_python_module("torchrec_fiited.ops.native");

  // Fused entry remap + chunk gather + pooling. Pruned chunks (slot -1) read as zeros and are
  // never loaded.
  //   weights             fp32  (C, chunk_size)   the pool
  //   chunk_slots         int16 | int32 (E, K)    slot of chunk k of entry e, or -1
  //   entries             int64 (n)               each in [0, E)
  //   offsets             int64 (B + 1)           bag b is entries[offsets[b]:offsets[b + 1]]
  //   per_sample_weights  fp32  (n) or None
  //   returns             fp32  (B, K * chunk_size)
  m.def(
      "lookup_forward(Tensor weights, Tensor chunk_slots, Tensor entries, Tensor offsets, "
      "Tensor? per_sample_weights, bool mean) -> Tensor");

  // lookup_forward writing into `out`, fp32 (B, K * chunk_size) with unit column stride: a
  // column block of a collection's (B, sum D) output, which saves the per-feature outputs and
  // their concatenation (a third of the forward at L=1, see benchmarks/bench_lookup.py).
  m.def(
      "lookup_forward_out(Tensor weights, Tensor chunk_slots, Tensor entries, Tensor offsets, "
      "Tensor? per_sample_weights, bool mean, Tensor(a!) out) -> ()");

  // Table-batched lookup_forward_out: the bags of F features of one pool back to back, one
  // call (one parallel region, one kernel) for all of them, each written into its column block
  // of a collection's (B, sum D) output (KeyedTensor layout).
  //   offsets       int64 (F * B + 1)   bag f * B + b is row b of feature f
  //   feature_cols  int64 (F)           first column of feature f's D = K * chunk_size block
  //   feature_mean  bool  (F)           divide feature f's non-empty bags by their length
  //   out           fp32  (B, W)        unit column stride; columns outside the blocks untouched
  m.def(
      "lookup_forward_batched_out(Tensor weights, Tensor chunk_slots, Tensor entries, "
      "Tensor offsets, Tensor? per_sample_weights, Tensor feature_cols, Tensor feature_mean, "
      "Tensor(a!) out) -> ()");

  // Coalesce one table's id gradients per entry, add to the utilities of every chunk of each
  // touched entry, then apply the optimizer to its live chunks, in place. Utilities are stored
  // against the entry table's base step (store/entry_table.py): u += a * g * utility_scale with
  // utility_scale = decay^(base - step), so no entry keeps a step of its own.
  //   grad_rows   fp32  (R, D)        pooled-output gradients of the table's bags
  //   row_of_id   int64 (n)           bag row of each id, in [0, R)
  //   id_scale    fp32  (n) or None   per-id gradient scale (sample weight, 1 / length)
  //   entries     int64 (n)           each in [0, E + G), or -1: the id is skipped
  //   chunk_slots int16 | int32 (E, K)  read only
  //   utilities   fp32  (E, K)        updated
  //   weights     fp32  (C, chunk_size)  updated at live slots
  //   momentum    fp32  (C, chunk_size) adagrad | (C) rowwise_adagrad | (0) sgd
  //   miss_utilities fp32 (G, K) or None  entry E + g is group g of ids without an entry (one
  //               per key): it earns a * g unscaled into row g and updates nothing else, so one
  //               sort serves an entry table's ids and its misses
  m.def(
      "fused_backward(Tensor grad_rows, Tensor row_of_id, Tensor? id_scale, Tensor entries, "
      "Tensor chunk_slots, Tensor(a!) utilities, Tensor(b!) weights, Tensor(c!) momentum, "
      "str optimizer, float lr, float eps, float weight_decay, str utility, "
      "float utility_scale, Tensor(d!)? miss_utilities=None) -> ()");
}
