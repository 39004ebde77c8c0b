"""VHPIStore: entry tables plus chunk pools, mutated only through allocate/evict.

The store knows nothing about utilities or thresholds (that is ``policy/``): it hands out slots,
takes them back, and keeps chunk_slots, live_mask and the pool counters consistent.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from torchrec_fiited.store.chunk_pool import ChunkPool
from torchrec_fiited.store.dim_map import DimMap, kept_errors, restrict_columns
from torchrec_fiited.store.entry_table import EntryTable
from torchrec_fiited.store.layout import (
    NEVER_SEEN,
    PRUNED,
    counter_uniform,
    mask_from_live,
    table_key,
)

# Chunks initialised per block in ``VHPIStore.allocate``.
_INIT_BLOCK = 8192


@dataclass(frozen=True)
class TableLayout:
    """Where one table's chunks live.

    Args:
        name: table name.
        num_entries: E.
        dim: D.
        chunk_size: D / K.
        pool: name of the ChunkPool holding its chunks.
        init_low: lower bound of the uniform init of a (re)allocated chunk.
        init_high: upper bound of it.
        global_name: the logical table this is a shard of (``name`` when unsharded).
        row_offset: global row of local entry 0 (row-wise shards).
        chunk_offset: global chunk index of local chunk 0 (column-wise shards).
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

    @property
    def logical_name(self) -> str:
        return self.global_name or self.name


class VHPIStore(nn.Module):
    """Virtually hashed, physically indexed chunk store for a collection of tables.

    Args:
        layouts: one ``TableLayout`` per table.
        pool_capacities: slots of each pool named in the layouts.
        num_chunks: K.
        optimizer: fixes the per-slot optimizer state shape.
        device: where the tensors live.
        seed: keys the initial values of allocated chunks (see ``init_values``).
        dim_pruning: give every table a ``DimMap`` (FIITED-2D), so its pool can later store
            only some columns of each chunk (``restrict_columns``).
    """

    def __init__(
        self,
        layouts: Sequence[TableLayout],
        pool_capacities: Mapping[str, int],
        num_chunks: int,
        optimizer: str,
        device: torch.device,
        seed: int = 0,
        dim_pruning: bool = False,
    ) -> None:
        super().__init__()
        self.num_chunks = num_chunks
        self.optimizer = optimizer
        self.seed = seed
        self.layouts: Dict[str, TableLayout] = {t.name: t for t in layouts}
        self.tables = nn.ModuleDict(
            {t.name: EntryTable(t.num_entries, num_chunks, device) for t in layouts}
        )
        chunk_size = {t.pool: t.chunk_size for t in layouts}
        self.pools = nn.ModuleDict(
            {
                name: ChunkPool(cap, chunk_size[name], num_chunks, optimizer, device)
                for name, cap in pool_capacities.items()
            }
        )
        # Empty without dimension pruning, so such a store's state_dict keys stay as they were.
        self.dim_maps = nn.ModuleDict(
            {t.name: DimMap(num_chunks, t.chunk_size, device) for t in layouts} if dim_pruning else {}
        )

    def tables_of_pool(self, pool: str) -> List[str]:
        return [t.name for t in self.layouts.values() if t.pool == pool]

    def pool_of(self, table: str) -> ChunkPool:
        return self.pools[self.layouts[table].pool]

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

    def init_values(
        self,
        table: str,
        entries: torch.Tensor,
        chunk_ids: torch.Tensor,
        step: int,
        kept: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Initial weights fp32 [n, stored_width] of chunks allocated at ``step``.

        Uniform in the table's init range, keyed by (seed, logical table, global row, global
        column, step): a regrown chunk gets new values, and a chunk gets the same values
        whichever rank or plan holds it. Only the stored columns are drawn: ``kept`` (int64
        [K, w]), by default the table's current column map.
        """
        layout = self.layouts[table]
        cs = layout.chunk_size
        rows = (entries.to(torch.int64) + layout.row_offset).unsqueeze(1)
        first_col = (chunk_ids.to(torch.int64) + layout.chunk_offset) * cs
        if kept is None and table in self.dim_maps:
            kept = self.dim_maps[table].kept
        in_chunk = torch.arange(cs, device=entries.device) if kept is None else kept[chunk_ids]
        cols = first_col.unsqueeze(1) + in_chunk
        u = counter_uniform([self.seed, table_key(layout.logical_name), rows, cols, step])
        return layout.init_low + (layout.init_high - layout.init_low) * u

    def allocate(
        self, table: str, entries: torch.Tensor, chunk_ids: torch.Tensor, step: int
    ) -> None:
        """Give chunk ``chunk_ids[i]`` of entry ``entries[i]`` a fresh slot (int64 [n] each).

        The chunks must be pruned and the pool must have ``n`` free slots. Each new chunk gets
        ``init_values`` for ``step`` and zeroed optimizer state.
        """
        if entries.numel() == 0:
            return
        layout = self.layouts[table]
        pool = self.pools[layout.pool]
        slots = pool.pop(entries.numel())
        # In blocks: the counter-based init holds several int64 temporaries per float it draws, so
        # one call for a cycle's ~100k regrown chunks of 16 floats peaked at +70 MB RSS each
        # (tests/modules/test_memory.py). The values do not depend on the blocking.
        for lo in range(0, slots.numel(), _INIT_BLOCK):
            hi = lo + _INIT_BLOCK
            pool.reset_slots(
                slots[lo:hi], self.init_values(table, entries[lo:hi], chunk_ids[lo:hi], step)
            )
        et = self.tables[table]
        et.chunk_slots[entries, chunk_ids] = slots.to(torch.int32)
        self._refresh_mask(et, entries)
        pool.live_per_chunk += torch.bincount(chunk_ids, minlength=self.num_chunks)

    def evict(self, table: str, entries: torch.Tensor, chunk_ids: torch.Tensor) -> None:
        """Prune live chunks ``(entries[i], chunk_ids[i])`` and return their slots to the pool."""
        if entries.numel() == 0:
            return
        et = self.tables[table]
        pool = self.pool_of(table)
        pool.push(et.chunk_slots[entries, chunk_ids])
        et.chunk_slots[entries, chunk_ids] = PRUNED
        self._refresh_mask(et, entries)
        pool.live_per_chunk -= torch.bincount(chunk_ids, minlength=self.num_chunks)

    @staticmethod
    def _refresh_mask(et: EntryTable, entries: torch.Tensor) -> None:
        # Recomputed from chunk_slots: a bit-or through fancy indexing loses repeated entries.
        touched = torch.unique(entries)
        et.live_mask[touched] = mask_from_live(et.chunk_slots[touched] >= 0)

    def admit(
        self,
        table: str,
        entries: torch.Tensor,
        step: int,
        quota: Sequence[int],
    ) -> None:
        """First-touch admission of ``entries`` (unique int64 [n]) seen in training at ``step``.

        Entries seen for the first time are recorded; chunk k of each is allocated, in entry
        order, while the pool has free slots and fewer than ``quota[k]`` live chunk-k chunks.
        The rest start pruned (reading zeros) and wait for a pruning cycle, where they compete
        by utility like every other chunk.
        """
        et = self.tables[table]
        new = et.mark_seen(entries, step)
        pool = self.pool_of(table)
        for k in range(self.num_chunks):
            room = min(pool.free_count(), int(quota[k]) - int(pool.live_per_chunk[k]))
            if room <= 0 or new.numel() == 0:
                continue
            take = new[:room]
            self.allocate(table, take, torch.full_like(take, k), step)

    def dense_weights(self, table: str) -> torch.Tensor:
        """The logical table: fp32 [E, D], pruned chunks and pruned dimensions as zeros."""
        et = self.tables[table]
        pool = self.pool_of(table)
        slots = et.chunk_slots.to(torch.int64)
        live = slots >= 0
        stored = pool.weights[slots.clamp(min=0)] * live.unsqueeze(-1)  # [E, K, stored_width]
        return self.widen(table, stored.reshape(et.num_entries, -1))

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
        """Make every entry of ``table`` seen with all chunks live, holding ``weights`` [E, D].

        Raises:
            ValueError: if the shape is wrong, the table was already trained, or its pool lacks
                the free slots for every chunk (a budget below 1 cannot hold a full table).
        """
        layout = self.layouts[table]
        et = self.tables[table]
        E, D, K = layout.num_entries, layout.dim, self.num_chunks
        if tuple(weights.shape) != (E, D):
            raise ValueError(
                f"table {table!r}: dense weights must have shape ({E}, {D}), got {tuple(weights.shape)}"
            )
        if int(et.num_seen) != 0:
            raise ValueError(f"table {table!r}: dense weights can only be loaded into a fresh table")
        pool = self.pool_of(table)
        if pool.free_count() < E * K:
            raise ValueError(
                f"table {table!r}: loading {E * K} chunks needs that many free slots, the pool "
                f"{layout.pool!r} has {pool.free_count()} (raise the budget to 1.0)"
            )
        entries = torch.arange(E, device=et.chunk_slots.device)
        et.mark_seen(entries, 0)
        rows = entries.repeat_interleave(K)
        chunk_ids = torch.arange(K, device=rows.device).repeat(E)
        self.allocate(table, rows, chunk_ids, 0)
        slots = et.chunk_slots.to(torch.int64).reshape(-1)
        stored = self.narrow(table, weights.detach().to(pool.weights))
        pool.weights[slots] = stored.reshape(E * K, pool.stored_width)

    def invariant_errors(self, state: Optional[Mapping[str, torch.Tensor]] = None) -> List[str]:
        """Consistency problems in ``state`` (this store's own state_dict by default).

        Checks every slot is referenced at most once across live chunks and the free stack
        together, free + live = capacity, masks agree with slots, and the seen bookkeeping.
        """
        state = self.state_dict() if state is None else state
        errors: List[str] = []
        for pool_name, pool in self.pools.items():
            errors += self._pool_errors(pool_name, pool.capacity, state)
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

    def _pool_errors(self, pool_name: str, capacity: int, state) -> List[str]:
        p = f"pools.{pool_name}."
        num_free = int(state[p + "num_free"])
        if not 0 <= num_free <= capacity:
            return [f"pool {pool_name!r}: num_free={num_free} outside [0, {capacity}]"]
        refs = [state[p + "free_stack"][:num_free].to(torch.int64)]
        live_per_chunk = torch.zeros(self.num_chunks, dtype=torch.int64)
        errors: List[str] = []
        for table in self.tables_of_pool(pool_name):
            t = f"tables.{table}."
            slots = state[t + "chunk_slots"].to(torch.int64)
            live = slots >= 0
            if bool(((slots < PRUNED) | (slots >= capacity)).any()):
                errors.append(f"table {table!r}: chunk_slots outside [-1, {capacity})")
                continue
            if not torch.equal(mask_from_live(live), state[t + "live_mask"]):
                errors.append(f"table {table!r}: live_mask disagrees with chunk_slots")
            refs.append(slots[live])
            live_per_chunk += live.sum(0).cpu()
            errors += _seen_errors(table, state, t)
        refs = torch.cat([r.cpu() for r in refs])
        if refs.numel() and (refs.min() < 0 or refs.max() >= capacity):
            errors.append(f"pool {pool_name!r}: free_stack holds slots outside [0, {capacity})")
        elif refs.numel() != capacity or torch.unique(refs).numel() != capacity:
            errors.append(
                f"pool {pool_name!r}: live + free slots must cover each of {capacity} slots "
                f"exactly once, got {refs.numel()} references to {torch.unique(refs).numel()} slots"
            )
        if not torch.equal(live_per_chunk, state[p + "live_per_chunk"].cpu()):
            errors.append(f"pool {pool_name!r}: live_per_chunk disagrees with chunk_slots")
        return errors


def _seen_errors(table: str, state, t: str) -> List[str]:
    num_seen = int(state[t + "num_seen"])
    seen_flag = state[t + "last_step"] != NEVER_SEEN
    if num_seen != int(seen_flag.sum()):
        return [f"table {table!r}: num_seen={num_seen} but {int(seen_flag.sum())} entries are seen"]
    if bool(((state[t + "chunk_slots"] >= 0).any(1) & ~seen_flag).any()):
        return [f"table {table!r}: an entry never seen holds live chunks"]
    return []
