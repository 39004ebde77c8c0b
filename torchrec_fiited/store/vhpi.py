"""VHPIStore (store v2): per pool, resident entries in a hash table, a utility sketch for the
rest, chunk pools; per table, an optional hashed fallback and FIITED-2D column map.

The store knows nothing about thresholds (that is ``policy/``): it resolves keys, admits and
erases entries, hands out slots and takes them back, and keeps keys, chunk_slots and the pool
counters consistent. Every tensor it holds is sized by ``store.sizing`` from the budget; none by
``num_embeddings``.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from torchrec_fiited.ops import dispatch
from torchrec_fiited.ops.hash_reference import EMPTY_KEY, bucket_of
from torchrec_fiited.store.chunk_pool import ChunkPool
from torchrec_fiited.store.dim_map import DimMap, kept_errors, restrict_columns
from torchrec_fiited.store.entry_table import EntryTable
from torchrec_fiited.store.fallback import FallbackGrid, HashedFallback
from torchrec_fiited.store.layout import (
    PRUNED,
    MAX_TABLES,
    counter_state_int,
    entry_key,
    slot_dtype,
    key_row,
    key_table,
    table_key,
)
from torchrec_fiited.store.sizing import SKETCH_DEPTH, PoolSizes
from torchrec_fiited.store.sketch import UtilitySketch

# Chunks initialised per block in ``VHPIStore.allocate``: the reference generator holds several
# int64 temporaries per float.
_INIT_BLOCK = 8192


class _InitLut(NamedTuple):
    """A pool's chunk-init parameters by table index (``layout.MAX_TABLES`` rows each): the
    generator state after (seed, logical table), the init range and the global chunk offset."""

    state: torch.Tensor  # int64 [MAX_TABLES]
    low: torch.Tensor  # fp32 [MAX_TABLES]
    span: torch.Tensor  # fp32 [MAX_TABLES], init_high - init_low
    chunk_offset: torch.Tensor  # int64 [MAX_TABLES]
    chunk_size: int


def _init_lut(store: "VHPIStore", pool: str, device: torch.device) -> _InitLut:
    tables = [store.layouts[name] for name in store._by_index[pool].values()]
    state, low, span, offset = [0] * MAX_TABLES, [0.0] * MAX_TABLES, [0.0] * MAX_TABLES, [0] * MAX_TABLES
    for t in tables:
        state[t.table_index] = counter_state_int([store.seed, table_key(t.logical_name)])
        # Rounded to fp32 as the per-table init_values rounds its Python floats.
        low[t.table_index], span[t.table_index] = t.init_low, t.init_high - t.init_low
        offset[t.table_index] = t.chunk_offset
    cs = tables[0].chunk_size if tables else 0
    return _InitLut(
        torch.tensor(state, dtype=torch.int64, device=device),
        torch.tensor(low, dtype=torch.float32, device=device),
        torch.tensor(span, dtype=torch.float32, device=device),
        torch.tensor(offset, dtype=torch.int64, device=device),
        cs,
    )


@dataclass(frozen=True)
class TableLayout:
    """Where one table's chunks live.

    Args:
        name: table name.
        num_entries: E, rows of the id space (sizes nothing).
        dim: D.
        chunk_size: D / K.
        pool: name of the pool holding its entries and chunks.
        init_low: lower bound of the uniform init of a (re)allocated chunk.
        init_high: upper bound of it.
        global_name: the logical table this is a shard of (``name`` when unsharded).
        row_offset: global row of local row 0 (row-wise shards).
        chunk_offset: global chunk index of local chunk 0 (column-wise shards).
        table_index: position of the logical table among the collection's global tables (the
            top bits of its keys).
        row_block: a row-wise shard by hash range: it holds the ids whose
            ``row_permutation(id, num_entries)`` lies in [lo, hi), keyed by the id itself
            (``row_offset`` 0); None for a table holding all its rows or a block of them.
        fallback_width: permuted rows per hashed-fallback bucket of the logical table (the same
            for each of its shards; ``store.fallback``); 0: absent ids read zeros.
    """

    name: str
    num_entries: int
    dim: int
    chunk_size: int
    pool: str
    init_low: float
    init_high: float
    global_name: str = ""
    row_offset: int = 0
    chunk_offset: int = 0
    table_index: int = 0
    row_block: Optional[Tuple[int, int]] = None
    fallback_width: int = 0

    @property
    def logical_name(self) -> str:
        return self.global_name or self.name

    @property
    def num_rows(self) -> int:
        """Rows this table holds of its id space (its share, which the budget sizes)."""
        return self.row_block[1] - self.row_block[0] if self.row_block else self.num_entries

    def holds(self, rows: torch.Tensor) -> torch.Tensor:
        """bool [n]: which global ``rows`` (int64 [n]) are this table's."""
        if self.row_block is None:
            return (rows >= self.row_offset) & (rows < self.row_offset + self.num_entries)
        inside = (rows >= 0) & (rows < self.num_entries)
        clamped = rows.clamp(0, self.num_entries - 1).to(torch.int64)
        hashed = dispatch.row_permutation(clamped, [0, clamped.numel()], [self.num_entries], [0],
                                          inverse=False)
        return inside & (hashed >= self.row_block[0]) & (hashed < self.row_block[1])

    @property
    def fallback_grid(self) -> FallbackGrid:
        """The buckets of its table's hashed fallback that meet its rows (``fallback_width`` 0:
        none). A block of rows (``row_offset``) holds every bucket, as a whole table does."""
        lo, hi = self.row_block if self.row_block else (0, self.num_entries)
        return FallbackGrid(self.num_entries, self.fallback_width, lo, hi)

    @property
    def shard_start(self) -> int:
        """Where its rows start in the plan: row offset, or its hash range's start."""
        return self.row_block[0] if self.row_block else self.row_offset


class VHPIStore(nn.Module):
    """Virtually hashed, physically indexed chunk store for a collection of tables.

    Args:
        layouts: one ``TableLayout`` per table.
        sizes: per pool named in the layouts, the sizes of its tensors (``store.sizing``).
        num_chunks: K.
        optimizer: fixes the per-slot optimizer state shape.
        device: where the tensors live.
        seed: keys the initial values of allocated chunks (see ``init_values``).
        dim_pruning: give every table a ``DimMap`` (FIITED-2D).
        utility_decay: gamma, how the entries' utilities decay per step (``EntryTable``).
    """

    def __init__(
        self,
        layouts: Sequence[TableLayout],
        sizes: Mapping[str, PoolSizes],
        num_chunks: int,
        optimizer: str,
        device: torch.device,
        seed: int = 0,
        dim_pruning: bool = False,
        utility_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_chunks = num_chunks
        self.optimizer = optimizer
        self.seed = seed
        self.sizes = dict(sizes)
        self.layouts: Dict[str, TableLayout] = {t.name: t for t in layouts}
        chunk_size = {t.pool: t.chunk_size for t in layouts}
        self.pools = nn.ModuleDict(
            {p: ChunkPool(s.slots, chunk_size[p], num_chunks, optimizer, device) for p, s in sizes.items()}
        )
        self.entries = nn.ModuleDict(
            {p: EntryTable(s.num_buckets, s.bucket_size, num_chunks, device, utility_decay,
                           slot_dtype(s.slots))
             for p, s in sizes.items()}
        )
        self.sketches = nn.ModuleDict(
            {p: UtilitySketch(s.sketch_width, SKETCH_DEPTH, num_chunks, device) for p, s in sizes.items()}
        )
        self.fallbacks = nn.ModuleDict(
            {
                t.name: HashedFallback(
                    t.fallback_grid, t.dim, optimizer, (t.init_low, t.init_high), seed, device,
                    t.chunk_offset * t.chunk_size,
                )
                for t in layouts
                if t.fallback_grid.rows > 0
            }
        )
        # Empty without dimension pruning, so such a store's state_dict keys stay as they were.
        self.dim_maps = nn.ModuleDict(
            {t.name: DimMap(num_chunks, t.chunk_size, device) for t in layouts} if dim_pruning else {}
        )
        self._by_index: Dict[str, Dict[int, str]] = {}
        for t in layouts:
            mine = self._by_index.setdefault(t.pool, {})
            if t.table_index in mine:
                raise ValueError(
                    f"tables {mine[t.table_index]!r} and {t.name!r} share pool {t.pool!r} and "
                    f"table index {t.table_index}"
                )
            mine[t.table_index] = t.name
        self._init_luts = {p: _init_lut(self, p, device) for p in sizes}

    # ---- names and keys -----------------------------------------------------------------------

    def tables_of_pool(self, pool: str) -> List[str]:
        return [t.name for t in self.layouts.values() if t.pool == pool]

    def pool_of(self, table: str) -> ChunkPool:
        return self.pools[self.layouts[table].pool]

    def entries_of(self, table: str) -> EntryTable:
        return self.entries[self.layouts[table].pool]

    def keys(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        """Keys int64 [n] of local ``rows`` int64 [n] of ``table``."""
        layout = self.layouts[table]
        return entry_key(layout.table_index, rows.to(torch.int64) + layout.row_offset)

    def table_masks(self, pool: str, keys: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        """(table, bool [n]) for each table of ``pool`` that owns some of ``keys``."""
        idx = key_table(keys)
        out = []
        for i, name in self._by_index[pool].items():
            mask = idx == i
            if bool(mask.any()):
                out.append((name, mask))
        return out

    def table_entries(self, table: str) -> torch.Tensor:
        """Resident entries int64 [n] of ``table`` (ascending)."""
        et = self.entries_of(table)
        seen = et.seen()
        return seen[key_table(et.keys_of(seen)) == self.layouts[table].table_index]

    def stored_columns(self, table: str) -> Optional[torch.Tensor]:
        """Row column in [0, D) of each column ``table``'s pool stores, int64 [D_active] in
        storage order; None when whole chunks are stored."""
        dm = self.dim_maps[table] if table in self.dim_maps else None
        return None if dm is None else dm.flat_columns()

    def active_dim(self, table: str) -> int:
        """D_active: the columns of a row that can be non-zero."""
        return self.num_chunks * self.pool_of(table).stored_width

    def restrict_columns(
        self, pool: str, kept_by_table: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, int]:
        """Make ``pool`` store columns ``kept_by_table[t]`` (int64 [K, w]) of its tables' chunks;
        see ``store.dim_map.restrict_columns``. The pool's tensors are replaced."""
        return restrict_columns(self, pool, kept_by_table, step)

    # ---- chunk values -------------------------------------------------------------------------

    def init_values(
        self,
        table: str,
        rows: torch.Tensor,
        chunk_ids: torch.Tensor,
        step: int,
        kept: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Initial weights fp32 [n, stored_width] of chunks allocated at ``step``.

        Uniform in the table's init range, keyed by (seed, logical table, global row, global
        column, step): a regrown chunk gets new values, and a chunk gets the same values
        whichever rank or plan holds it. ``rows`` are global rows (``key_row``). Only the stored
        columns are drawn: ``kept`` (int64 [K, w]), by default the table's current column map.
        """
        layout = self.layouts[table]
        if kept is None and table in self.dim_maps:
            kept = self.dim_maps[table].kept
        state = counter_state_int([self.seed, table_key(layout.logical_name)])
        state = torch.full((rows.numel(),), state, dtype=torch.int64, device=rows.device)
        u = self._uniforms(state, rows, chunk_ids, layout.chunk_offset, layout.chunk_size, kept,
                           step)
        return layout.init_low + (layout.init_high - layout.init_low) * u

    def _uniforms(self, state, rows, chunk_ids, chunk_offset, cs: int, kept, step: int):
        """The generator's fp32 [n, w] for (state[i], row, column of chunk_ids[i], step)."""
        first_col = (chunk_ids.to(torch.int64) + chunk_offset) * cs
        in_chunk = torch.arange(cs, device=rows.device) if kept is None else kept[chunk_ids]
        cols = first_col.unsqueeze(1) + in_chunk  # int64 [n, w]
        return dispatch.counter_uniform_grid(state.contiguous(), rows.to(torch.int64), cols, [step])

    # ---- slots --------------------------------------------------------------------------------

    def allocate(self, pool: str, entries: torch.Tensor, chunk_ids: torch.Tensor, step: int) -> None:
        """Give chunk ``chunk_ids[i]`` of resident entry ``entries[i]`` a fresh slot (int64 [n]).

        The chunks must be pruned and the pool must have ``n`` free slots. Each new chunk gets
        ``init_values`` for ``step`` and zeroed optimizer state.
        """
        if entries.numel() == 0:
            return
        et, cp = self.entries[pool], self.pools[pool]
        slots = cp.pop(entries.numel())
        keys = et.keys_of(entries)
        if not any(t in self.dim_maps for t in self._by_index[pool].values()):
            # Every table of the pool at once: per-key generator state, init range and chunk
            # offset from the key's table (bitwise the per-table init_values).
            lut = self._init_luts[pool]
            tidx = key_table(keys)
            for lo in range(0, slots.numel(), _INIT_BLOCK):
                hi = lo + _INIT_BLOCK
                t = tidx[lo:hi]
                u = self._uniforms(lut.state[t], key_row(keys[lo:hi]), chunk_ids[lo:hi],
                                   lut.chunk_offset[t], lut.chunk_size, None, step)
                cp.reset_slots(slots[lo:hi], lut.low[t].unsqueeze(1) + lut.span[t].unsqueeze(1) * u)
        else:  # FIITED-2D: each table stores its own columns
            for table, mask in self.table_masks(pool, keys):
                t_slots, t_rows, t_ks = slots[mask], key_row(keys[mask]), chunk_ids[mask]
                for lo in range(0, t_slots.numel(), _INIT_BLOCK):
                    hi = lo + _INIT_BLOCK
                    cp.reset_slots(
                        t_slots[lo:hi], self.init_values(table, t_rows[lo:hi], t_ks[lo:hi], step)
                    )
        et.chunk_slots[entries, chunk_ids] = slots.to(et.chunk_slots.dtype)
        cp.live_per_chunk += torch.bincount(chunk_ids, minlength=self.num_chunks)

    def evict(self, pool: str, entries: torch.Tensor, chunk_ids: torch.Tensor) -> None:
        """Prune live chunks ``(entries[i], chunk_ids[i])`` and return their slots to the pool."""
        if entries.numel() == 0:
            return
        et, cp = self.entries[pool], self.pools[pool]
        cp.push(et.chunk_slots[entries, chunk_ids])
        et.chunk_slots[entries, chunk_ids] = PRUNED
        cp.live_per_chunk -= torch.bincount(chunk_ids, minlength=self.num_chunks)

    # ---- entries ------------------------------------------------------------------------------

    def _release(self, pool: str, entries: torch.Tensor, keys: torch.Tensor, utilities: torch.Tensor) -> None:
        """Free the payload of ``entries`` (their keys already gone from the index): slots back
        to the pool, decayed ``utilities`` fp32 [n, K] into the sketch under ``keys``."""
        et = self.entries[pool]
        rows, ks = (et.chunk_slots[entries] >= 0).nonzero(as_tuple=True)
        self.evict(pool, entries[rows], ks)
        self.sketches[pool].raise_to(keys, utilities)
        et.utilities[entries] = 0.0

    def erase(self, pool: str, entries: torch.Tensor, utilities: torch.Tensor) -> None:
        """Make resident ``entries`` (distinct int64 [n]) non-resident; their chunks are freed and
        their utilities (fp32 [n, K], decayed to now) go to the sketch."""
        if entries.numel() == 0:
            return
        et = self.entries[pool]
        keys = et.keys_of(entries).clone()
        et.index.erase(keys)
        self._release(pool, entries, keys, utilities)
        et.num_seen -= entries.numel()

    def admit(
        self,
        pool: str,
        keys: torch.Tensor,
        step: int,
        quota: Sequence[int],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Try to make non-resident ``keys`` (distinct int64 [n]) of a training batch resident.

        Each key's score is its sketch estimate (summed over chunks). A key takes a free slot of
        its hash bucket, else it displaces the bucket's weakest candidate (an entry without a
        live chunk, scored by its row utility as of the last cycle; see ``protect``) if it beats
        it, else it stays out. A displaced entry's
        chunks are freed and its utilities go to the sketch. A new entry starts with the
        sketch's per-chunk estimate as its utilities; chunk k of new entries is then allocated,
        in descending estimate, to those whose estimate reaches the last cycle's threshold of
        chunk k (any, before the first cycle), while the pool has free slots and fewer than
        ``quota[k]`` live chunk-k chunks. The rest start pruned and compete at the next cycle.

        Returns:
            (entry int64 [n] of each key, -1 where it stays out; the entries displaced to make
            room, int64 [d]: their slots may now hold keys of ``keys``).
        """
        none = torch.empty(0, dtype=torch.int64, device=keys.device)
        if keys.numel() == 0:
            return none, none
        et, sketch = self.entries[pool], self.sketches[pool]
        estimate = sketch.estimate(keys)
        score = estimate.sum(1)
        slots, evicted_keys, evicted = et.index.insert(keys, score)
        if evicted.numel():
            u = et.utilities_at(evicted, step)
            self._release(pool, evicted, evicted_keys, u)
            et.num_seen -= evicted.numel()
        placed = slots >= 0
        new, estimate, score = slots[placed], estimate[placed], score[placed]
        if new.numel() == 0:
            return slots, evicted
        et.set_utilities(new, estimate, step)
        et.num_seen += new.numel()
        order = torch.sort(score, descending=True, stable=True).indices
        new, estimate = new[order], estimate[order]
        cp = self.pools[pool]
        for k in range(self.num_chunks):
            room = min(cp.free_count(), int(quota[k]) - int(cp.live_per_chunk[k]))
            if room <= 0:
                continue
            # Only what the last cycle would have kept: otherwise the slots a cycle's eviction
            # freed went to whichever cold ids arrived first, to be evicted at the next cycle.
            take = new[estimate[:, k] >= et.thresholds[k]][:room]
            self.allocate(pool, take, torch.full_like(take, k), step)
        self.protect(pool, new)
        return slots, evicted

    def protect(self, pool: str, entries: torch.Tensor) -> None:
        """Make entries holding a live chunk impossible to displace at admission (score +inf).

        Chunks are won and lost at pruning cycles, by thresholds over the pool's sample; an
        admission only displaces a *candidate* (an entry without a chunk). Otherwise every cold id
        over-estimated by the sketch could knock out a row with trained chunks between cycles."""
        et = self.entries[pool]
        holds = (et.chunk_slots[entries] >= 0).any(1)
        et.index.scores[entries[holds]] = float("inf")

    # ---- dense views (small tables: tests, export) ---------------------------------------------

    def dense_weights(self, table: str) -> torch.Tensor:
        """The logical table: fp32 [E, D], pruned chunks, non-resident rows and pruned dimensions
        as zeros. Needs E x D floats: a view for tests and small tables, not a checkpoint form."""
        layout = self.layouts[table]
        et, cp = self.entries_of(table), self.pool_of(table)
        entries = self.table_entries(table)
        slots = et.chunk_slots[entries].to(torch.int64)
        live = slots >= 0
        stored = cp.weights[slots.clamp(min=0)] * live.unsqueeze(-1)
        out = torch.zeros(layout.num_entries, self.active_dim(table), device=cp.weights.device)
        rows = key_row(et.keys_of(entries)) - layout.row_offset
        out[rows] = stored.reshape(entries.numel(), out.shape[1])  # -1 is ambiguous at 0 entries
        return self.widen(table, out)

    def widen(self, table: str, stored: torch.Tensor) -> torch.Tensor:
        """[n, D_active] in storage order -> [n, D] with pruned dimensions as zeros."""
        cols = self.stored_columns(table)
        if cols is None:
            return stored
        out = stored.new_zeros(stored.shape[0], self.layouts[table].dim)
        return out.index_copy_(1, cols, stored)

    def narrow(self, table: str, full: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [n, D_active]: the stored columns, in storage order."""
        cols = self.stored_columns(table)
        return full if cols is None else full.index_select(1, cols)

    def load_dense_weights(self, table: str, weights: torch.Tensor) -> None:
        """Make every row of ``table`` resident with all chunks live, holding ``weights`` [E, D].

        Raises:
            ValueError: if the shape is wrong, the table was already trained, or its pool lacks
                the free entries or slots for every row and chunk.
        """
        layout = self.layouts[table]
        et, cp = self.entries_of(table), self.pool_of(table)
        E, D, K = layout.num_entries, layout.dim, self.num_chunks
        if tuple(weights.shape) != (E, D):
            raise ValueError(
                f"table {table!r}: dense weights must have shape ({E}, {D}), got {tuple(weights.shape)}"
            )
        if self.table_entries(table).numel() != 0:
            raise ValueError(f"table {table!r}: dense weights can only be loaded into a fresh table")
        if cp.free_count() < E * K:
            raise ValueError(
                f"table {table!r}: loading {E * K} chunks needs that many free slots, the pool "
                f"{layout.pool!r} has {cp.free_count()} (raise the budget)"
            )
        rows = torch.arange(E, device=cp.weights.device)
        keys = self.keys(table, rows)
        slots, _, evicted = et.index.insert(keys, torch.zeros(E, device=keys.device))
        if evicted.numel() or bool((slots < 0).any()):
            et.index.erase(keys[slots >= 0])
            raise ValueError(
                f"table {table!r}: the pool's hash table cannot hold all {E} rows (raise the budget)"
            )
        et.num_seen += E
        entries = slots.repeat_interleave(K)
        chunk_ids = torch.arange(K, device=rows.device).repeat(E)
        self.allocate(layout.pool, entries, chunk_ids, 0)
        flat = et.chunk_slots[entries, chunk_ids].to(torch.int64)
        stored = self.narrow(table, weights.detach().to(cp.weights))
        cp.weights[flat] = stored.reshape(E * K, cp.stored_width)

    # ---- consistency ---------------------------------------------------------------------------

    def invariant_errors(self, state: Optional[Mapping[str, torch.Tensor]] = None) -> List[str]:
        """Consistency problems in ``state`` (this store's own state_dict by default).

        Per pool: every slot referenced exactly once by live chunks and the free stack together,
        live counts agree with chunk_slots; resident keys unique, in their bucket and of this
        pool's tables, free entries and the null entry hold nothing.
        """
        state = self.state_dict() if state is None else state
        errors: List[str] = []
        for pool_name, pool in self.pools.items():
            errors += self._pool_errors(pool_name, pool.capacity, state)
            errors += self._entry_errors(pool_name, state)
            errors += self._dim_errors(pool_name, state)
        return errors

    def _dim_errors(self, pool_name: str, state) -> List[str]:
        """Column maps valid and of the width the pool's weights store."""
        errors: List[str] = []
        width = state[f"pools.{pool_name}.weights"].shape[1]
        for table in self.tables_of_pool(pool_name):
            if table not in self.dim_maps:
                continue
            kept = state[f"dim_maps.{table}.kept"]
            problem = kept_errors(kept, self.num_chunks, self.layouts[table].chunk_size)
            if problem is None and kept.shape[1] != width:
                problem = f"width {kept.shape[1]} vs {width} stored by pool {pool_name!r}"
            if problem is not None:
                errors.append(f"table {table!r}: dim_maps kept {problem}")
        return errors

    def _entry_errors(self, pool_name: str, state) -> List[str]:
        e = f"entries.{pool_name}."
        keys = state[e + "index.keys"]
        u = state[e + "utilities"]
        resident = keys != EMPTY_KEY
        errors: List[str] = []
        if bool((state[e + "chunk_slots"][-1] != PRUNED).any()) or bool((u[-1] != 0).any()):
            errors.append(f"pool {pool_name!r}: the null entry holds state")
        if bool((state[e + "chunk_slots"][:-1][~resident] != PRUNED).any()):
            errors.append(f"pool {pool_name!r}: a free entry holds live chunks")
        if bool((u[:-1][~resident] != 0).any()):
            errors.append(f"pool {pool_name!r}: a free entry holds utilities")
        if int(state[e + "num_seen"]) != int(resident.sum()):
            errors.append(f"pool {pool_name!r}: num_seen={int(state[e + 'num_seen'])} but "
                          f"{int(resident.sum())} keys are resident")
        k = keys[resident]
        if torch.unique(k).numel() != k.numel():
            errors.append(f"pool {pool_name!r}: a key is resident twice")
        W = self.entries[pool_name].index.bucket_size
        home = bucket_of(k, keys.numel() // W)
        if bool((home != resident.nonzero().squeeze(1) // W).any()):
            errors.append(f"pool {pool_name!r}: a key sits outside its hash bucket")
        known = torch.tensor(sorted(self._by_index[pool_name]), dtype=torch.int64)
        if k.numel() and not bool(torch.isin(key_table(k).cpu(), known).all()):
            errors.append(f"pool {pool_name!r}: a key names a table outside the pool")
        if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
            errors.append(f"pool {pool_name!r}: utilities must be finite and >= 0")
        return errors

    def _pool_errors(self, pool_name: str, capacity: int, state) -> List[str]:
        p = f"pools.{pool_name}."
        num_free = int(state[p + "num_free"])
        if not 0 <= num_free <= capacity:
            return [f"pool {pool_name!r}: num_free={num_free} outside [0, {capacity}]"]
        slots = state[f"entries.{pool_name}.chunk_slots"].to(torch.int64)
        if bool(((slots < PRUNED) | (slots >= capacity)).any()):
            return [f"pool {pool_name!r}: chunk_slots outside [-1, {capacity})"]
        live = slots >= 0
        refs = torch.cat([state[p + "free_stack"][:num_free].to(torch.int64).cpu(), slots[live].cpu()])
        errors: List[str] = []
        if refs.numel() and (refs.min() < 0 or refs.max() >= capacity):
            errors.append(f"pool {pool_name!r}: free_stack holds slots outside [0, {capacity})")
        elif refs.numel() != capacity or torch.unique(refs).numel() != capacity:
            errors.append(
                f"pool {pool_name!r}: live + free slots must cover each of {capacity} slots "
                f"exactly once, got {refs.numel()} references to {torch.unique(refs).numel()} slots"
            )
        if not torch.equal(live.sum(0).cpu(), state[p + "live_per_chunk"].cpu()):
            errors.append(f"pool {pool_name!r}: live_per_chunk disagrees with chunk_slots")
        return errors
