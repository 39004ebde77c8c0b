"""FIITED-2D: which columns of each chunk a pool stores, and how a pool changes width.

A table under dimension pruning has a ``DimMap``. Chunk k of every entry stores only the
columns ``kept[k]`` of its ``chunk_size``; the others are pruned dimensions and read as zeros.
All tables of a pool keep the same number ``cs'`` of columns (``stored_width``), so that its
slots stay interchangeable, but each table picks its own columns. ``D_active = K * cs'``.

The store never decides which columns to keep (that is ``policy/dims.py``); it only re-lays
out a pool when told, in ``restrict_columns``.
"""

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES
from torchrec_fiited.store.layout import key_row


class DimMap(nn.Module):
    """Stored columns and per-dimension utilities of one table.

    Buffers:
        kept: int64 [K, cs'], ascending columns in [0, chunk_size) that chunk k stores.
        utilities: fp32 [K, chunk_size], decayed sums of squared pooled-output gradients,
            for every column (pruned ones too, so that a dimension can come back).
        last_decision_step: int64 scalar, step of the last decision; -1 during the cold start.

    Args:
        num_chunks: K.
        chunk_size: columns per chunk.
        device: where the tensors live.
    """

    def __init__(self, num_chunks: int, chunk_size: int, device: torch.device) -> None:
        super().__init__()
        kept = torch.arange(chunk_size, device=device).repeat(num_chunks, 1)
        self.register_buffer("kept", kept)
        self.register_buffer("utilities", torch.zeros(num_chunks, chunk_size, device=device))
        self.register_buffer("last_decision_step", torch.tensor(-1, dtype=torch.int64, device=device))
        self.chunk_size = chunk_size

    @property
    def stored_width(self) -> int:
        return self.kept.shape[1]

    def flat_columns(self) -> Optional[torch.Tensor]:
        """Row column in [0, D) of each stored column, int64 [K * cs'] in storage order; None
        while every column is stored (no gather or scatter needed)."""
        if self.stored_width == self.chunk_size:
            return None
        first = torch.arange(self.kept.shape[0], device=self.kept.device) * self.chunk_size
        return (first.unsqueeze(1) + self.kept).reshape(-1)


def kept_errors(kept: torch.Tensor, num_chunks: int, chunk_size: int) -> Optional[str]:
    """Why ``kept`` is not a valid column map (None if it is): int64 [K, w], 1 <= w <= chunk_size,
    each row strictly ascending in [0, chunk_size)."""
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.int64 or kept.dim() != 2:
        got = (kept.dtype, tuple(kept.shape)) if isinstance(kept, torch.Tensor) else type(kept).__name__
        return f"must be an int64 [K, width] tensor, got {got}"
    K, w = kept.shape
    if K != num_chunks or not 1 <= w <= chunk_size:
        return f"must have shape ({num_chunks}, 1..{chunk_size}), got {tuple(kept.shape)}"
    if bool((kept < 0).any()) or bool((kept >= chunk_size).any()):
        return f"holds columns outside [0, {chunk_size})"
    if w > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()):
        return "rows must be strictly ascending"
    return None


def _positions(old_kept: torch.Tensor, new_kept: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Index in the old storage order of each new column, int64 [K, w_new]; -1 if it was pruned."""
    K = old_kept.shape[0]
    where = torch.full((K, chunk_size), -1, dtype=torch.int64, device=old_kept.device)
    where.scatter_(1, old_kept, torch.arange(old_kept.shape[1], device=old_kept.device).expand(K, -1))
    return where.gather(1, new_kept)


def restrict_columns(
    store, pool_name: str, kept_by_table: Mapping[str, torch.Tensor], step: int
) -> Dict[str, int]:
    """Re-lay out ``pool_name`` to store ``kept_by_table[t]`` (int64 [K, w], one width) per table.

    New weights [C, w] (and adagrad state [C, w]) replace the pool's tensors, so its bytes
    change right away. A column stored before keeps its value and optimizer state; a column
    that comes back is re-initialised like a regrown chunk (``init_values`` at ``step``) with
    zero adagrad state. Rowwise state, one scalar per slot, is kept. Free slots hold zeros.

    Returns:
        per table, how many (entry, chunk) pairs got at least one re-initialised column.
    """
    pool = store.pools[pool_name]
    widths = {int(k.shape[1]) for k in kept_by_table.values()}
    if len(widths) != 1 or set(kept_by_table) != set(store.tables_of_pool(pool_name)):
        raise ValueError(
            f"pool {pool_name!r}: every table of it ({store.tables_of_pool(pool_name)}) needs a "
            f"column map of one width, got widths {sorted(widths)} for {sorted(kept_by_table)}"
        )
    width = widths.pop()
    old_w, old_m = pool.weights, pool.momentum
    weights = old_w.new_zeros(pool.capacity, width)
    momentum = old_m.new_zeros(OPTIMIZER_STATE_SHAPES[pool.optimizer](pool.capacity, width))
    if old_m.dim() == 1:
        momentum.copy_(old_m)  # rowwise: one scalar per slot (sgd: empty)
    regrown: Dict[str, int] = {}
    for table, new_kept in kept_by_table.items():
        dm = store.dim_maps[table]
        new_kept = new_kept.to(dm.kept.device)
        et = store.entries_of(table)
        entries = store.table_entries(table)
        at, ks = (et.chunk_slots[entries] >= 0).nonzero(as_tuple=True)
        slots = et.chunk_slots[entries[at], ks].to(torch.int64)
        rows = key_row(et.keys_of(entries[at]))
        src = _positions(dm.kept, new_kept, dm.chunk_size)[ks]  # [n, w]
        stored = src >= 0
        old = old_w[slots.unsqueeze(1), src.clamp(min=0)]
        fresh = store.init_values(table, rows, ks, step, kept=new_kept)
        weights[slots] = torch.where(stored, old, fresh)
        if old_m.dim() == 2:
            momentum[slots] = torch.where(stored, old_m[slots.unsqueeze(1), src.clamp(min=0)], 0.0)
        regrown[table] = int((~stored).any(1).sum())
        dm.kept = new_kept.clone()
    pool.replace_storage(weights, momentum)
    return regrown
