"""Resident-id hash table: a fixed-capacity map from raw int64 ids to slots, with eviction scores.

The first block of store v2 (issue 11): an entry exists only for a *resident* id, so the
metadata scales with the budget, not with ``num_embeddings``. The table maps a key (a raw id)
to a ``slot`` in [0, S); a caller keeps its per-entry payload (chunk slots, utilities) in its own
tensors indexed by that slot.

Layout (HierarchicalKV-style bucketed open addressing, no digests, no resizing):

* S = num_buckets * bucket_size slots; bucket b owns slots [b * W, (b + 1) * W), W =
  ``bucket_size`` (a power of two, 8-128).
* ``keys`` int64 [S]: the resident key, or ``EMPTY_KEY`` (int64 min, refused as an input key).
* ``scores`` fp32 [S]: the eviction utility of each slot (larger is kept); 0 where empty.
* A key lives only in bucket ``(splitmix64(key) >> 32) * num_buckets >> 32``; lookup scans the
  W slots of that bucket, so probing is bounded by W and erase needs no tombstone (a freed slot
  is simply ``EMPTY_KEY`` again, reused by the next insert into that bucket).
* Insert: deterministic rule in ``ops/hash_reference.py`` (dedupe with the max score, residents
  of the batch pinned, missing keys of a bucket in (score desc, key asc) order take the lowest
  free slot or replace the bucket's minimum-score victim if strictly higher, else refused).

Bytes: 12 per slot (key 8 + score 4), so 12 / lambda per resident id at load factor lambda.
Measured with ``.venv/bin/python benchmarks/bench_hash_table.py --load-factor --seeds 0 1 2``
(2^20 slots, distinct random keys inserted 1024 at a time with equal scores, so that a full
bucket refuses instead of evicting; native and reference give the same figures), the load
factor when the first key is refused, and when a batch first has 1% of its keys refused:

    W      first refusal          B / id    1% refused             B / id
    8      0.163, 0.181, 0.137    66-88     0.327, 0.335, 0.320    36-38
    16     0.344, 0.288, 0.239    35-50     0.488, 0.485, 0.468    25-26
    32     0.448, 0.433, 0.496    24-28     0.616, 0.619, 0.612    19.5
    64     0.555, 0.559, 0.614    20-22     0.719, 0.720, 0.724    16.7
    128    0.703, 0.731, 0.718    16-17     0.791, 0.789, 0.790    15.2

The first refusal is the first bucket to fill (an extreme of W-slot bins under random keys), so
it comes early. It is not a failure: with min-eviction a full bucket keeps admitting keys that
beat its weakest resident, and a table under training fills towards lambda = 1, i.e. 12 B per
resident id; the load factor only says how many of the S slots hold a key by the time buckets
start to compete. The default W=32 scans 4 cache lines per probe (256 B of keys); W=128 buys
lambda 0.72 at first refusal for 16 lines per probe, a choice to make with digests (1 B per slot,
HierarchicalKV) in the integration, not here.

Throughput (``.venv/bin/python benchmarks/bench_hash_table.py``: 2^20 slots, W=32, 70% full,
batches of 64k Zipf(1.05) keys over 10M ids; 2 shared cores, load average 0.9-1.0), M keys/s:

    threads   native lookup   native insert   reference lookup   reference insert
    2         65.5            12.5            8.3                3.05
    1         37.2            7.0             4.8                1.9

Session 10: the probe compares a cache line of keys at once (AVX2), one branch per 8 keys
instead of one per key: native lookup 94-100 M keys/s on 2 threads, 48-58 on 1 (load 1.0-1.4).

Native insert spends much of its time sorting the batch by (bucket, key): sorting per thread and
merging took it from 10.1 to 12.5 M keys/s on 2 threads (one std::sort before); a radix sort as
in the fused backward is the next step if a profile confirms it.

Ops are batched and native (``torch.ops.fiited.hash_*``, C++ CPU) when the library is built,
the PyTorch reference otherwise (``ops/dispatch.py``). The CUDA kernels
(``cuda/fiited_hash_cuda.cu``) compile but have no torch registration yet, so a table on a GPU runs the reference.

Example::

    table = ResidentHashTable.from_budget(1 << 20, bucket_size=32)  # 87,360 slots, 1,048,320 B
    ids = torch.tensor([7, 123456789012, 7, -3])                    # int64 [n]
    r = table.insert(ids, torch.tensor([1.0, 2.0, 5.0, 0.5]))
    r.slots                      # int64 [4], equal for the two 7s (score max(1, 5) = 5)
    table.lookup(ids)            # == r.slots
    table.erase(torch.tensor([7]))  # 1
    table.lookup(ids)[0]         # -1
"""

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from torchrec_fiited.ops import dispatch
from torchrec_fiited.ops.hash_reference import EMPTY_KEY, bucket_of
from torchrec_fiited.store import memory

BYTES_PER_SLOT = 8 + 4  # key int64 + score fp32
DEFAULT_BUCKET_SIZE = 32
_MAX_BUCKETS = 1 << 31  # bucket_of's multiply-shift range


class InsertResult(NamedTuple):
    """What ``ResidentHashTable.insert`` did.

    Args:
        slots: int64 [n], the slot of each input key (equal keys share one), -1 where refused.
        evicted_keys: int64 [v], keys evicted to make room, in ascending order of their slot.
        evicted_slots: int64 [v], ascending: the slot each evicted key held (now a new key's).
            A caller frees the evicted entry's payload at these slots before reusing them.
    """

    slots: torch.Tensor
    evicted_keys: torch.Tensor
    evicted_slots: torch.Tensor


class ResidentHashTable(nn.Module):
    """Fixed-capacity bucketed hash table from raw int64 ids to slots, with fp32 scores.

    Buffers ``keys`` int64 [S] and ``scores`` fp32 [S], S = num_buckets * bucket_size (module
    docstring for the layout and the insert rule). All inputs are checked at the boundary and a
    bad one raises ``ValueError`` naming the argument, with the table unchanged.

    Args:
        num_buckets: buckets, >= 1 and <= 2^31.
        bucket_size: W, slots per bucket, a power of two in [8, 128].
        device: where the tensors live.
    """

    def __init__(self, num_buckets: int, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if not 8 <= bucket_size <= 128 or bucket_size & (bucket_size - 1):
            raise ValueError(f"bucket_size must be a power of two in [8, 128], got {bucket_size}")
        if not 1 <= num_buckets <= _MAX_BUCKETS:
            raise ValueError(f"num_buckets must be in [1, 2^31], got {num_buckets}")
        self.num_buckets = num_buckets
        self.bucket_size = bucket_size
        S = num_buckets * bucket_size
        self.register_buffer("keys", memory.full((S,), EMPTY_KEY, dtype=torch.int64, device=device))
        self.register_buffer("scores", memory.zeros((S,), device=device))

    @classmethod
    def from_budget(cls, budget_bytes: int, bucket_size: int = DEFAULT_BUCKET_SIZE,
                    device: Optional[torch.device] = None) -> "ResidentHashTable":
        """The largest table whose ``bytes()`` fit in ``budget_bytes``."""
        num_buckets = int(budget_bytes) // (bucket_size * BYTES_PER_SLOT)
        if num_buckets < 1:
            raise ValueError(
                f"budget_bytes must hold one bucket of {bucket_size} slots "
                f"({bucket_size * BYTES_PER_SLOT} B), got {budget_bytes}")
        return cls(min(num_buckets, _MAX_BUCKETS), bucket_size, device)

    @property
    def capacity(self) -> int:
        """S, the number of slots."""
        return self.keys.numel()

    def bytes(self) -> int:
        """Bytes of the table's tensors (12 per slot)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.scores))

    def num_resident(self) -> int:
        """Keys resident now."""
        return int((self.keys != EMPTY_KEY).sum())

    def bucket_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Bucket int64 [n] of each key of ``keys`` int64 [n]."""
        return bucket_of(self._check_keys("keys", keys), self.num_buckets)

    # ---- batched ops ----------------------------------------------------------------------------

    def lookup(self, keys: torch.Tensor, missing: int = -1) -> torch.Tensor:
        """Slot int64 [n] of each key of ``keys`` int64 [n], ``missing`` where not resident.
        Read-only."""
        keys = self._check_keys("keys", keys)
        return dispatch.hash_lookup(self.keys, self.bucket_size, keys, missing)

    def lookup_entry_keys(self, keys: torch.Tensor, missing: int,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``lookup`` of keys made by ``store.layout.entry_key`` (the collection's hot path):
        they are non-negative by construction, so the scan for the empty-key sentinel (a pass
        and a sync over the batch) is skipped; the native op still refuses it. With ``out``
        (int64 [n]), written there."""
        return dispatch.hash_lookup(self.keys, self.bucket_size, keys, missing, out=out)

    def insert(self, keys: torch.Tensor, scores: torch.Tensor) -> InsertResult:
        """Insert the missing keys of ``keys`` int64 [n] with ``scores`` fp32 [n].

        Resident keys keep their slot and score (use ``update_scores``). The rule for full buckets
        and duplicates is the module docstring's; the result does not depend on the thread count.
        """
        keys = self._check_keys("keys", keys)
        scores = self._check_scores("scores", scores, keys.numel())
        return InsertResult(*dispatch.hash_insert(
            self.keys, self.scores, self.bucket_size, keys, scores))

    def erase(self, keys: torch.Tensor) -> int:
        """Free the slots of the resident keys among ``keys`` int64 [n]; returns how many."""
        keys = self._check_keys("keys", keys)
        return dispatch.hash_erase(self.keys, self.scores, self.bucket_size, keys)

    def update_scores(self, slots: torch.Tensor, scores: torch.Tensor) -> None:
        """Set the score of resident ``slots`` int64 [n] (distinct) to ``scores`` fp32 [n]."""
        slots = self._check_1d("slots", slots, torch.int64)
        scores = self._check_scores("scores", scores, slots.numel())
        if slots.numel() == 0:
            return
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= self.capacity:
            raise ValueError(f"slots must be in [0, {self.capacity}), got values in [{lo}, {hi}]")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("slots must be distinct (one score per slot), got duplicates")
        empty = self.keys[slots] == EMPTY_KEY
        if bool(empty.any()):
            raise ValueError(
                f"slots must hold resident keys, got empty slot {int(slots[empty][0])}")
        self.scores[slots] = scores

    def resident_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys int64 [R], slots int64 [R]) of every resident key, in ascending slot order."""
        slots = (self.keys != EMPTY_KEY).nonzero().squeeze(1)
        return self.keys[slots], slots

    # ---- checkpoint -----------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str,
                              local_metadata: Dict[str, Any], strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        """Validate the saved table first (strict, like ``KeyedOptimizer``), then load it."""
        keys, scores = state_dict.get(prefix + "keys"), state_dict.get(prefix + "scores")
        if keys is not None and scores is not None:
            self._validate_saved(keys, scores)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _validate_saved(self, keys: torch.Tensor, scores: torch.Tensor) -> None:
        S = self.capacity
        if keys.dtype != torch.int64 or tuple(keys.shape) != (S,):
            raise ValueError(f"state_dict keys must be int64 [{S}], got {keys.dtype} "
                             f"{list(keys.shape)}")
        if scores.dtype != torch.float32 or tuple(scores.shape) != (S,):
            raise ValueError(f"state_dict scores must be fp32 [{S}], got {scores.dtype} "
                             f"{list(scores.shape)}")
        slots = (keys != EMPTY_KEY).nonzero().squeeze(1)
        resident = keys[slots]
        if torch.unique(resident).numel() != resident.numel():
            raise ValueError("state_dict keys hold a key in more than one slot")
        home = bucket_of(resident, self.num_buckets)
        wrong = home != slots // self.bucket_size
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            raise ValueError(
                f"state_dict keys: key {int(resident[i])} sits in slot {int(slots[i])} (bucket "
                f"{int(slots[i]) // self.bucket_size}), but its bucket is {int(home[i])} "
                f"(saved with another num_buckets or hash?)")
        if bool(torch.isnan(scores).any()):
            raise ValueError("state_dict scores must not be NaN")

    # ---- input checks ---------------------------------------------------------------------------

    def _check_1d(self, name: str, t: Any, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D {dtype} tensor, got a {t.dim()}-D {t.dtype} tensor")
        if t.device != self.keys.device:
            raise ValueError(f"{name} must be on {self.keys.device} (the table's device), "
                             f"got {t.device}")
        return t.contiguous()

    def _check_keys(self, name: str, keys: Any) -> torch.Tensor:
        keys = self._check_1d(name, keys, torch.int64)
        bad = keys == EMPTY_KEY
        if bool(bad.any()):
            raise ValueError(
                f"{name} must not contain {EMPTY_KEY} (int64 min, the empty-slot sentinel), got it "
                f"at index {int(bad.nonzero()[0])}; map ids away from it (e.g. store.hash_ids)")
        return keys

    def _check_scores(self, name: str, scores: Any, n: int) -> torch.Tensor:
        scores = self._check_1d(name, scores, torch.float32)
        if scores.numel() != n:
            raise ValueError(
                f"{name} must have one score per key/slot, got {scores.numel()} vs {n}")
        if bool(torch.isnan(scores).any()):
            raise ValueError(f"{name} must not be NaN (scores are compared), got NaN at index "
                             f"{int(torch.isnan(scores).nonzero()[0])}")
        return scores
