"""VHPI layout: the terms every FIITED module uses, defined once.

A table with ``E`` rows (``num_embeddings``, the id space) and dim ``D`` is split into ``K``
chunks of ``chunk_size = D / K`` floats. ``chunk_id`` k in [0, K) names the k-th slice
``[k*chunk_size, (k+1)*chunk_size)`` of every row.

Virtually hashed (store v2: entries exist only for resident ids; see ``EntryTable``). One entry
table per pool, shared by the pool's tables, keyed by (table, row) as in the paper:

    key               int64 ``table_index << 56 | row`` (``entry_key``): row in [0, E) is the id
                      itself, or ``hash(id) % E`` with ``hash_ids``; table_index is the table's
                      position among the collection's global tables
    entry             slot of a key in the pool's ResidentHashTable, in [0, S); S is the null
                      entry that every non-resident id reads (no chunk, never updated)
    chunk_slots       int16/int32 [S + 1, K]  pool slot of chunk k of entry e, or PRUNED (-1);
                                        int16 in a pool of at most 2^15 slots (``slot_dtype``)
    utilities         fp32  [S + 1, K]  u = gamma * u + a * g, stored against the table's base
                                        step (``EntryTable.utility_base``): the true utility
                                        at step t is u * gamma ** (t - base); 0 for a free entry

Non-resident ids (no entry) accumulate their utility in a count-min sketch (``UtilitySketch``)
and read zeros, or a small hashed fallback table (``HashedFallback``) with ``miss="hashed"``.

Physically indexed (one pool per group of tables sharing a budget; see ``ChunkPool``):

    slot              row index in [0, capacity) of a pool
    weights           fp32  [capacity, chunk_size]
    momentum          fp32  [capacity, chunk_size] (adagrad), [capacity] (rowwise), [0] (sgd)
    free_stack        int16/int32 [capacity]  free slots; the top is free_stack[num_free - 1]

A pruned chunk reads as zeros. Its utility keeps growing from the gradient at its zero-padded
slice, so it can win a slot back at a later pruning cycle.

Dimension pruning (FIITED-2D, optional; see ``DimMap``), per table:

    kept              int64 [K, cs']  columns in [0, chunk_size) chunk k stores, ascending
    stored_width      cs', the same for every table of a pool; weights is [capacity, cs']
    D_max             D, the width of a row as the model sees it
    D_active          K * cs', the columns of a row that can be non-zero
    dim utilities     fp32 [K, chunk_size]  u_d = gamma * u_d + sum_b grad[b, d] ** 2

A pruned dimension reads as zeros in every row; it still earns utility, so it can come back.
"""

import zlib
from typing import Sequence, Union

import torch

PRUNED = -1
# A pool of at most this many slots indexes them with int16 (chunk_slots, free_stack): 2 bytes
# per entry and chunk index and 2 per slot saved where the budget is smallest (at 100x on the hard
# preset a pool has ~750 slots; a pool of 10^6 rows at 1% has ~10^4).
SMALL_POOL_SLOTS = 2**15


def slot_dtype(capacity: int) -> torch.dtype:
    """The dtype of a pool's slot indices: int16 up to ``SMALL_POOL_SLOTS`` slots, else int32."""
    return torch.int16 if capacity <= SMALL_POOL_SLOTS else torch.int32


def slot_index_bytes(capacity: int) -> int:
    """Bytes of one slot index of a pool of ``capacity`` slots."""
    return slot_dtype(capacity).itemsize


NEVER_SEEN = -1  # a logical form's last_step where no shard holds the row (store.logical)


ROW_BITS = 56  # rows of a key: ids below 2^56; the top 7 bits name the table (< 128 tables)
MAX_TABLES = 1 << (63 - ROW_BITS)
_ROW_MASK = (1 << ROW_BITS) - 1


def entry_key(table_index: int, rows: torch.Tensor) -> torch.Tensor:
    """Keys int64 [n] of ``rows`` (global rows, int64 [n]) of the table at ``table_index``."""
    return (rows.to(torch.int64) & _ROW_MASK) | (table_index << ROW_BITS)


def key_table(keys: torch.Tensor) -> torch.Tensor:
    """Table index int64 [n] of each key."""
    return keys >> ROW_BITS


def key_row(keys: torch.Tensor) -> torch.Tensor:
    """Global row int64 [n] of each key."""
    return keys & _ROW_MASK


# splitmix64's finalizer, in signed int64 arithmetic (torch has no uint64 multiply).
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _logical_shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    # Literals, not _MIX1/_MIX2: TorchScript (a scripted serving module hashes ids) cannot read
    # int globals. They are _MIX1 and _MIX2 as signed int64.
    x = (x ^ _logical_shift_right(x, 30)) * -4658895280553007687
    x = (x ^ _logical_shift_right(x, 27)) * -7723592293110705685
    return x ^ _logical_shift_right(x, 31)


def hash_ids(ids: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Map arbitrary int64 ids to entries in [0, num_entries), well mixed (int64 [n] -> [n])."""
    return torch.remainder(_mix64(ids.to(torch.int64)), num_entries)


def table_key(name: str) -> int:
    """A stable 32-bit id of a table name, the same in every process and plan."""
    return zlib.crc32(name.encode())


_LOW31 = (1 << 31) - 1


def as_int64(key: Union[int, torch.Tensor]) -> torch.Tensor:
    """``key`` as an int64 tensor (0-d for an int; a tensor key is cast), exact in int64's range.

    ``torch.as_tensor(k, dtype=torch.int64)`` keeps only the low 32 bits of an int ``k`` that
    torch.compile has made dynamic (a SymInt; torch 2.13 with inductor: crc32 table keys >= 2^31,
    e.g. of "t2" and "user", came out negative). Built from 31-bit pieces, each exact as an
    int32, the value is right in eager and compiled code alike.
    """
    if isinstance(key, torch.Tensor):
        return key.to(torch.int64)
    lo, mid, hi = key & _LOW31, (key >> 31) & _LOW31, key >> 62  # hi in [-2, 1]
    return (
        (torch.as_tensor(hi, dtype=torch.int64) << 62)
        | (torch.as_tensor(mid, dtype=torch.int64) << 31)
        | torch.as_tensor(lo, dtype=torch.int64)
    )


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def counter_uniform(keys: Sequence[Union[int, torch.Tensor]]) -> torch.Tensor:
    """Uniform [0, 1) floats that depend only on ``keys`` (ints or broadcastable int64 tensors).

    A counter-based generator: the same (seed, table, row, chunk, step, ...) gives the same value
    in any process, plan or world size, which is what makes re-initialisation and sampling
    independent of where a row lives (and so reshardable and comparable across plans).
    """
    return counter_uniform_from(torch.tensor(0, dtype=torch.int64), keys)


def counter_state_int(keys: Sequence[int]) -> int:
    """The generator's state after folding int ``keys``, as a Python int (signed int64):
    ``counter_uniform(keys + rest)`` is ``counter_uniform_from(tensor(state), rest)``. Computed
    without tensors, so a module built under ``torch.device("meta")`` still gets real values."""
    m = (1 << 64) - 1
    x = 0
    for key in keys:
        x = ((x ^ (key & m)) + (_GOLDEN & m)) & m
        x = ((x ^ (x >> 30)) * (_MIX1 & m)) & m
        x = ((x ^ (x >> 27)) * (_MIX2 & m)) & m
        x ^= x >> 31
    return x - (1 << 64) if x >> 63 else x


def counter_uniform_from(state: torch.Tensor, keys: Sequence[Union[int, torch.Tensor]]) -> torch.Tensor:
    """``counter_uniform`` continued from ``state`` (int64, broadcastable with ``keys``)."""
    x = state
    for key in keys:
        x = _mix64((x ^ as_int64(key)) + _GOLDEN)
    # The top 24 bits give every fp32 in [0, 1) on a 2^-24 grid, never 1.0.
    return _logical_shift_right(x, 40).to(torch.float32) * (1.0 / (1 << 24))


# Round keys of the row permutation's Feistel network (arbitrary odd constants).
_FEISTEL_KEYS = (0x2545F4914F6CDD1D, 0x1B873593CC9E2D51, 0x5BD1E9955BD1E995, 0x27D4EB2F165667C5)


def _feistel(x: torch.Tensor, half: int, inverse: bool) -> torch.Tensor:
    mask = (1 << half) - 1
    left, right = x >> half, x & mask
    for key in reversed(_FEISTEL_KEYS) if inverse else _FEISTEL_KEYS:
        if inverse:  # undo (L, R) -> (R, L ^ F(R))
            left, right = right ^ (_mix64(left ^ key) & mask), left
        else:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << half) | right


def row_permutation(rows: torch.Tensor, num_rows: int, inverse: bool = False) -> torch.Tensor:
    """A fixed pseudo-random bijection of [0, num_rows) (int64 [n] -> [n]); ``inverse`` undoes it.

    Row-wise shards own contiguous blocks of the permuted rows, i.e. hash ranges of the ids, so
    hot ids (Criteo's low ids, say) spread over the ranks whatever their values, and every id
    keeps its own key (the permutation is invertible, not a hash that collides). A 4-round
    Feistel network on the smallest even number of bits covering ``num_rows``, cycle-walked
    back into range (fewer than 4 rounds of walking on average). The same in every process.
    """
    if num_rows < 1:
        raise ValueError(f"row_permutation needs num_rows >= 1, got {num_rows}")
    bits = max(2, (num_rows - 1).bit_length())
    half = (bits + 1) // 2
    out = _feistel(rows.to(torch.int64), half, inverse)
    out_of_range = torch.nonzero(out >= num_rows).squeeze(1)
    while out_of_range.numel():
        walked = _feistel(out[out_of_range], half, inverse)
        out[out_of_range] = walked
        out_of_range = out_of_range[walked >= num_rows]
    return out
