// Schemas of the resident-id hash table ops (torchrec_fiited/store/hash_table.py). The table is
// two flat tensors of S = num_buckets * bucket_size slots; bucket b owns slots
// [b * bucket_size, (b + 1) * bucket_size). Semantics (the insert rule, the eviction order) are
// those of torchrec_fiited/ops/hash_reference.py; the CPU kernels are in fiited_hash_cpu.cpp,
// the CUDA kernels in fiited_hash_cuda.cu, the fake impls in torchrec_fiited/ops/native.py.

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fiited, m) {
  // Slot of each key, `missing` (default -1) where not resident.
  //   table_keys  int64 (S)   kFiitedEmptyKey where free
  //   keys        int64 (n)   none equal to kFiitedEmptyKey
  //   returns     int64 (n)
  m.def("hash_lookup(Tensor table_keys, int bucket_size, Tensor keys, int missing=-1) -> Tensor");
  // hash_lookup into `out` int64 (n), contiguous (a buffer reused across training steps).
  m.def(
      "hash_lookup_out(Tensor table_keys, int bucket_size, Tensor keys, int missing, "
      "Tensor(a!) out) -> ()");

  // Insert the missing keys (dedupe by max score, residents pinned, per bucket in (score desc,
  // key asc) order: lowest free slot, else replace the min-score victim if strictly higher).
  //   table_keys    int64 (S)  updated
  //   table_scores  fp32  (S)  updated at the slots that take a key
  //   keys, scores  int64 (n), fp32 (n)
  //   returns       slots int64 (n) (-1 = refused), evicted_keys int64 (v), evicted_slots int64
  //                 (v), evictions in ascending slot order
  m.def(
      "hash_insert(Tensor(a!) table_keys, Tensor(b!) table_scores, int bucket_size, Tensor keys, "
      "Tensor scores) -> (Tensor, Tensor, Tensor)");

  // Free the slots of the resident keys (key kFiitedEmptyKey, score 0); returns how many, as a
  // 0-D int64 tensor (a tensor, not an int, so that fake tensors and torch.compile can trace it).
  m.def(
      "hash_erase(Tensor(a!) table_keys, Tensor(b!) table_scores, int bucket_size, Tensor keys) "
      "-> Tensor");
}
