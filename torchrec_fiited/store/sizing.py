"""Every byte of a FIITED pool, defined once: what the budget buys and how it is split.

``budget`` is the fraction of the unpruned tables' bytes (fp32 weights plus the same optimizer's
state: one fp32 per row for rowwise Adagrad, one per float for Adagrad, none for SGD) that a
pool holds *in total*: chunk weights, their optimizer state and free stack, the resident
entries' hash table and payload, the utility sketch, the hashed fallback, the FIITED-2D maps
and the counters. ``pool_bytes`` is the exact sum of the tensors the store allocates for a
``PoolSizes``; ``size_pool`` picks the largest sizes whose ``pool_bytes`` fit the budget.

The split (``size_pool``): fixed tensors first; then ``fallback_fraction`` of the budget to the
fallback tables (``miss="hashed"`` only, per table in proportion to its full bytes);
``sketch_fraction`` to the sketch (only when the pool cannot hold an entry for every row); the
rest to entries and chunk slots at ``entries_per_slot`` entries per slot. The default,
1.25 / max(1, K / 2), expects a resident row to hold half of its K chunks (chunk skew: chunk 0
for many rows, the last chunks for few) with a quarter more entries kept as candidates; K=1
(AdaEmbed) gets 1.25 entries per slot, the candidates. When every row and every chunk fits,
the pool takes exactly that (entries for all rows at load <= 1/2, a slot for every chunk) and
leaves the rest of the budget unspent.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES
from torchrec_fiited.store.fallback import FallbackGrid, bucket_width
from torchrec_fiited.store.layout import SMALL_POOL_SLOTS, slot_index_bytes
from torchrec_fiited.store.sketch import SKETCH_CELL_BYTES

INT64, FP32, INT32 = 8, 4, 4
SKETCH_DEPTH = 2
MIN_BUCKET, DEFAULT_BUCKET = 8, 32
# Entries per hash-table slot when every row of the pool fits: low enough that no bucket of 32
# overflows in practice (Poisson(16) > 32 is ~1e-4 per bucket).
FULL_LOAD = 0.5


def _numel(shape) -> int:
    return math.prod(shape)


def optimizer_floats(optimizer: str, rows: int, width: int) -> int:
    """fp32 values of optimizer state for ``rows`` rows of ``width`` floats."""
    return _numel(OPTIMIZER_STATE_SHAPES[optimizer](rows, width))


def full_table_bytes(num_rows: int, dim: int, optimizer: str) -> int:
    """Bytes of the unpruned table: fp32 [E, D] and the optimizer's state (rowwise: [E])."""
    return FP32 * (num_rows * dim + optimizer_floats(optimizer, num_rows, dim))


def _index_bytes(slots: Optional[int]) -> int:
    """Bytes of one slot index in a pool of ``slots`` slots (``layout.slot_dtype``); None: int32."""
    return INT32 if slots is None else slot_index_bytes(slots)


def entry_bytes(num_chunks: int, slots: Optional[int] = None) -> int:
    """Bytes per hash-table slot: key, score, K chunk slots, K utilities (``slots``: the pool's
    chunk slots, which fix the width of a slot index; None: int32)."""
    return INT64 + FP32 + _index_bytes(slots) * num_chunks + FP32 * num_chunks


def slot_bytes(chunk_size: int, optimizer: str, slots: Optional[int] = None) -> int:
    """Bytes per pool slot: weights, optimizer state, free-stack entry (``slots`` as above)."""
    return FP32 * (chunk_size + optimizer_floats(optimizer, 1, chunk_size)) + _index_bytes(slots)


@dataclass(frozen=True)
class TableSpec:
    """What sizing needs of one table of a pool."""

    name: str
    num_rows: int
    dim: int


@dataclass(frozen=True)
class PoolSizes:
    """The sizes of one pool's tensors.

    Args:
        slots: chunk slots.
        num_buckets: buckets of the entry hash table (S = num_buckets * bucket_size entries).
        bucket_size: W.
        sketch_width: cells per sketch row (0: no sketch).
        fallback_rows: hashed fallback rows per table (0: reads zeros).
    """

    slots: int
    num_buckets: int
    bucket_size: int
    sketch_width: int
    fallback_rows: Dict[str, int] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return self.num_buckets * self.bucket_size


def fixed_bytes(tables: Sequence[TableSpec], num_chunks: int, optimizer: str, dim_pruning: bool,
                slots: Optional[int] = None) -> int:
    """Bytes that do not depend on the sizes: counters, the null entry, FIITED-2D maps, the
    module's step counter (charged to every pool, so each pool's total stays within budget)."""
    K = num_chunks
    pool = INT64 + INT64 * K  # num_free, live_per_chunk
    entries = _index_bytes(slots) * K + FP32 * K + 3 * INT64  # null entry, num_seen, last-cycle counts
    entries += INT64  # the utility base step
    entries += FP32 * K  # last thresholds
    entries += INT64  # the sketch's decay step
    dims = dim_map_bytes(tables) if dim_pruning else 0
    return pool + entries + dims + INT64  # + steps_done


def dim_map_bytes(tables: Sequence[TableSpec]) -> int:
    """FIITED-2D's per-table maps at full width: kept columns (int64), column utilities (fp32)
    and the decision step. Fixed per column of every table, whatever the budget."""
    return sum((INT64 + FP32) * t.dim + INT64 for t in tables)


def min_pool_bytes(tables: Sequence[TableSpec], num_chunks: int, optimizer: str,
                   dim_pruning: bool = False) -> int:
    """The smallest pool ``size_pool`` can build: its fixed bytes, one bucket, one slot.

    A column shard of the last chunk indices can be due less than that (its chunks are the
    ones the fitted ratios prune most) and still needs entries for its rows; it gets this."""
    cs = tables[0].dim // num_chunks
    return (fixed_bytes(tables, num_chunks, optimizer, dim_pruning, 1)
            + MIN_BUCKET * entry_bytes(num_chunks, 1) + slot_bytes(cs, optimizer, 1))


def pool_bytes(sizes: PoolSizes, tables: Sequence[TableSpec], num_chunks: int, optimizer: str,
               dim_pruning: bool = False) -> Dict[str, int]:
    """Bytes of each component of a pool of ``sizes`` (chunk size from the first table)."""
    K = num_chunks
    cs = tables[0].dim // K
    fallback = sum(
        FP32 * (sizes.fallback_rows.get(t.name, 0) * t.dim
                + optimizer_floats(optimizer, sizes.fallback_rows.get(t.name, 0), t.dim))
        for t in tables
    )
    out = {
        "chunks": sizes.slots * slot_bytes(cs, optimizer, sizes.slots),
        "entries": sizes.entries * entry_bytes(K, sizes.slots),
        "sketch": SKETCH_CELL_BYTES * SKETCH_DEPTH * sizes.sketch_width * K if sizes.sketch_width else 0,
        "fallback": fallback,
        "fixed": fixed_bytes(tables, K, optimizer, dim_pruning, sizes.slots),
    }
    out["total"] = sum(out.values())
    return out


# miss="auto": a hashed fallback when the pool's entries cover fewer than this fraction of its
# tables' ids. Measured on the hard preset (3 seeds, K=2): at 1000x (entries for 0.09% of the
# ids) the fallback gained +0.018 AUC; at 100x (1.0%) it lost 0.004-0.010, the 10% of the
# bytes it takes being worth more as entries and chunks there.
AUTO_FALLBACK_COVERAGE = 0.003

# The sketch's share of a pool's budget grows to one cell per entry up to this much.
MAX_SKETCH_FRACTION = 0.25

# Row pruning (K=1) holds at most this fraction of its entries live: with a row for every
# entry, a cycle has nothing to prune and the table keeps its first ids for good (AdaEmbed at
# 1000x did: 64 entries, 77 slots, churn 0). With K >= 2 the fitted ratios prune the last chunks.
MAX_LIVE_FRACTION = 0.8


def max_useful_slots(entries: int, num_chunks: int) -> int:
    """Chunk slots ``entries`` can use while leaving pruning something to decide."""
    if num_chunks > 1:
        return max(1, entries * num_chunks)
    return max(1, int(MAX_LIVE_FRACTION * entries))


def default_entries_per_slot(num_chunks: int) -> float:
    return 1.25 / max(1.0, num_chunks / 2)


def size_pool(
    tables: Sequence[TableSpec],
    budget: float,
    num_chunks: int,
    optimizer: str,
    *,
    miss: str = "zeros",
    fallback_fraction: float = 0.1,
    sketch_fraction: float = 0.05,
    entries_per_slot: Optional[float] = None,
    bucket_size: int = DEFAULT_BUCKET,
    dim_pruning: bool = False,
    budget_bytes: Optional[float] = None,
    fallback_rows: Optional[Mapping[str, int]] = None,
    sketch_width: Optional[int] = None,
) -> PoolSizes:
    """The largest sizes of one pool whose ``pool_bytes`` fit ``budget`` x its full bytes.

    Args:
        tables: the pool's tables (one chunk size).
        budget: fraction of the full bytes, in (0, 1].
        budget_bytes: the bytes to fit instead (a shard's share); overrides ``budget``.
        fallback_rows: the fallback rows of each table, decided by the caller (a shard holds the
            buckets of its table's fallback that meet its rows); overrides ``miss`` and
            ``fallback_fraction``.
        sketch_width: the sketch's width (at least; bytes the split leaves over widen it)
            instead of its share of the budget (a column shard's part of its logical pool's).

    Raises:
        ValueError: naming the tables, if the budget cannot hold one bucket and one slot.
    """
    if miss == "auto" and fallback_rows is None:
        kwargs = dict(fallback_fraction=fallback_fraction, sketch_fraction=sketch_fraction,
                      entries_per_slot=entries_per_slot, bucket_size=bucket_size,
                      dim_pruning=dim_pruning, budget_bytes=budget_bytes,
                      sketch_width=sketch_width)
        zeros = size_pool(tables, budget, num_chunks, optimizer, miss="zeros", **kwargs)
        if zeros.entries >= AUTO_FALLBACK_COVERAGE * sum(t.num_rows for t in tables):
            return zeros
        return size_pool(tables, budget, num_chunks, optimizer, miss="hashed", **kwargs)
    args = (tables, budget, num_chunks, optimizer, miss, fallback_fraction, sketch_fraction,
            entries_per_slot, bucket_size, dim_pruning, budget_bytes, fallback_rows, sketch_width)
    # Slot indices priced at int16 first; a pool that comes out larger needs int32 ones.
    small = _size_pool(*args, index_slots=SMALL_POOL_SLOTS)
    return small if small.slots <= SMALL_POOL_SLOTS else _size_pool(*args, index_slots=None)


def _size_pool(tables, budget, num_chunks, optimizer, miss, fallback_fraction, sketch_fraction,
               entries_per_slot, bucket_size, dim_pruning, budget_bytes, fallback_rows,
               sketch_width, index_slots: Optional[int]) -> PoolSizes:
    """``size_pool`` with slot indices priced as in a pool of ``index_slots`` slots."""
    K = num_chunks
    cs = tables[0].dim // K
    full = sum(full_table_bytes(t.num_rows, t.dim, optimizer) for t in tables)
    B = budget * full if budget_bytes is None else budget_bytes
    names = [t.name for t in tables]
    left = B - fixed_bytes(tables, K, optimizer, dim_pruning, index_slots)
    rows = sum(t.num_rows for t in tables)
    e, c = entry_bytes(K, index_slots), slot_bytes(cs, optimizer, index_slots)

    if fallback_rows is not None:
        fallback_rows = {t.name: int(fallback_rows[t.name]) for t in tables
                         if fallback_rows.get(t.name, 0) > 0}
        left -= sum(full_table_bytes(fallback_rows.get(t.name, 0), t.dim, optimizer) for t in tables)
        if left < MIN_BUCKET * e + c:
            raise ValueError(
                f"budget {budget:g} ({B:.0f} bytes) cannot hold the hashed fallback rows "
                f"{fallback_rows} and one bucket and slot for tables {names}"
            )
    elif miss == "hashed":
        fallback_rows = {}
        spend = fallback_fraction * B
        for t in tables:
            share = spend * full_table_bytes(t.num_rows, t.dim, optimizer) / full
            per_row = full_table_bytes(1, t.dim, optimizer)
            most = min(t.num_rows, int(share // per_row))
            # Whole buckets of the permuted rows (store.fallback): ceil(E / width) <= most.
            width = bucket_width(t.num_rows, most)
            fallback_rows[t.name] = FallbackGrid(t.num_rows, width, 0, t.num_rows).rows
        spent = sum(full_table_bytes(fallback_rows[t.name], t.dim, optimizer) for t in tables)
        if left - spent < MIN_BUCKET * e + c:  # the fallback would leave no entry or slot
            fallback_rows = {t.name: 0 for t in tables}
            spent = 0
        left -= spent
    else:
        fallback_rows = {}

    # Everything fits: entries for every row at load <= FULL_LOAD and a slot for every chunk.
    W = bucket_size
    all_buckets = max(1, math.ceil(rows / FULL_LOAD / W))
    if all_buckets * W * e + rows * K * c <= left:
        return PoolSizes(rows * K, all_buckets, W, 0, fallback_rows)

    alpha = default_entries_per_slot(K) if entries_per_slot is None else entries_per_slot
    cell = SKETCH_CELL_BYTES * SKETCH_DEPTH * K  # bytes per unit of sketch width
    given = sketch_width is not None
    if not given:
        sketch_width = int(sketch_fraction * B // cell)
    if sketch_width and not given:
        # At least one cell per entry in each row (within MAX_SKETCH_FRACTION of the budget):
        # the entries with E = left / (e + c / alpha + cell). A byte share alone left FIITED at
        # 1000x 23 cells for 111k ids and blind admission (-0.119 AUC; one cell per entry,
        # -0.070, as AdaEmbed).
        per_entry = left / (e + c / alpha + cell)
        sketch_width = max(sketch_width, min(int(per_entry), int(MAX_SKETCH_FRACTION * B // cell)))
    if left - cell * sketch_width < MIN_BUCKET * e + c:
        sketch_width = 0  # a budget this small buys one bucket and a slot first
    left -= cell * sketch_width
    slots = int(left / (alpha * e + c))
    entries = alpha * slots
    W = bucket_size
    while W > MIN_BUCKET and entries < 4 * W:  # at least 4 buckets where the size allows
        W //= 2

    def split(num_buckets: int) -> int:
        slots = int((left - num_buckets * W * e) // c)
        return min(slots, rows * K, max_useful_slots(num_buckets * W, K))

    # Whole buckets: the count (floor or ceil) whose split is nearest the target ratio. A floor
    # alone can leave K=1 more slots than entries (never used; a table that never fills never
    # evicts: AdaEmbed at 1000x kept 64 entries for 77 slots, churn 0); a ceil alone can take
    # most of a tiny pool's slots.
    options = [n for n in sorted({max(1, math.floor(entries / W)), max(1, math.ceil(entries / W))})
               if n * W * e + c <= left and split(n) >= 1]
    num_buckets = min(options, key=lambda n: abs(math.log(n * W / (alpha * split(n)))),
                      default=max(1, math.floor(entries / W)))
    slots = split(num_buckets)
    if sketch_width and slots >= 1:  # bytes the entries/slots split leaves over widen the sketch
        spare = left - num_buckets * W * e - slots * c
        sketch_width += int(spare // cell)
    if slots < 1 or left < num_buckets * W * e:
        need = min_pool_bytes(tables, K, optimizer, dim_pruning)
        raise ValueError(
            f"budget {budget:g} ({B:.0f} bytes) cannot hold one bucket of {MIN_BUCKET} entries and "
            f"one chunk slot for tables {names} (needs at least {need} bytes)"
        )
    return PoolSizes(slots, num_buckets, W, sketch_width, fallback_rows)
