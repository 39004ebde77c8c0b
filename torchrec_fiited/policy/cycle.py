"""One pruning cycle over a pool: sample, decide, then evict and allocate.

The phases are separate so that a coordinator (``policy/coordinator.py``) can gather the samples
of every rank between ``sample_pool`` and ``ThresholdPolicy.decide``, and then let each rank run
``apply_decision`` on its own shard. Samples carry plan-independent row keys and global chunk
indices, so the merged sample, and with it every threshold, is the same whatever the plan.
"""

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from torchrec_fiited.policy.thresholds import PruneDecision
from torchrec_fiited.store.layout import counter_uniform
from torchrec_fiited.store.vhpi import VHPIStore

# Keys the sampling draws apart from the init draws, which use the same counter generator.
_SAMPLE_SALT = 0x5A4D


@dataclass
class PoolSample:
    """Utilities of the chunks of sampled entries of one (local) pool.

    Args:
        utilities: fp32 [m, K_local], decayed to the cycle's step.
        live: bool [m, K_local].
        row_keys: int64 [m], the key (``store.layout.entry_key``) of each sampled entry.
        chunk_offset: global chunk index of column 0 (column-wise shards hold a chunk range).
    """

    utilities: torch.Tensor
    live: torch.Tensor
    row_keys: torch.Tensor
    chunk_offset: int


def count_seen(store: VHPIStore, pool: str) -> Tuple[int, int, int]:
    """(chunk offset of ``pool``'s tables, its resident entries, its chunk slots); the pool
    holds chunks [offset, offset + store.num_chunks).

    A row is resident in each column shard that holds one of its chunks (a row-wise or whole
    table has one shard), so across the plan the resident rows are at least the largest count
    of any chunk range, and the slots are the sum over every pool (each slot holds one chunk).
    """
    tables = store.tables_of_pool(pool)
    offset = store.layouts[tables[0]].chunk_offset if tables else 0
    return offset, int(store.entries[pool].num_seen), int(store.pools[pool].capacity)


def sample_pool(
    store: VHPIStore, pool: str, m: int, step: int, num_seen_total: int
) -> PoolSample:
    """Sample each resident entry of ``pool`` with probability m / num_seen_total.

    Whether an entry is drawn depends only on (seed, key, step), and keys name the logical
    table and global row, so every column shard of a row draws it alike and the union over
    ranks is the single-process sample.
    """
    p = min(1.0, m / max(1, num_seen_total))
    offsets = {store.layouts[name].chunk_offset for name in store.tables_of_pool(pool)}
    if len(offsets) > 1:
        raise RuntimeError(f"[torchrec_fiited] pool {pool!r} mixes chunk offsets {offsets}")
    et = store.entries[pool]
    entries = et.seen()
    keys = et.keys_of(entries)
    if p < 1.0:
        picked = counter_uniform([store.seed, _SAMPLE_SALT, keys, step]) < p
        entries, keys = entries[picked], keys[picked]
    return PoolSample(
        et.utilities_at(entries, step),
        et.chunk_slots[entries] >= 0,
        keys,
        offsets.pop() if offsets else 0,
    )


def merge_samples(
    parts: Sequence[PoolSample], num_chunks: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One [R, K] utility matrix (fp32), live mask (bool) and present mask (bool: the sampled
    row is resident in the shard holding that chunk) from samples of any plan.

    Rows are the distinct sampled keys in ascending order; a part fills the chunk columns it
    holds. Thresholds are order-free (quantiles, counts), so any plan gives the same decision.
    Only column shards leave a row absent from some chunks.
    """
    parts = [p for p in parts if p.row_keys.numel()]
    if not parts:
        empty = torch.zeros(0, num_chunks, dtype=torch.bool)
        return torch.zeros(0, num_chunks), empty, empty.clone()
    keys = torch.unique(torch.cat([p.row_keys.cpu() for p in parts]))
    u = torch.zeros(keys.numel(), num_chunks)
    live = torch.zeros(keys.numel(), num_chunks, dtype=torch.bool)
    present = torch.zeros(keys.numel(), num_chunks, dtype=torch.bool)
    for p in parts:
        rows = torch.searchsorted(keys, p.row_keys.cpu())
        cols = slice(p.chunk_offset, p.chunk_offset + p.utilities.shape[1])
        u[rows, cols] = p.utilities.cpu()
        live[rows, cols] = p.live.cpu()
        present[rows, cols] = True
    return u, live, present


@dataclass
class CycleCounts:
    """Evictions, allocations and erased entries of one cycle, per table."""

    evictions: Dict[str, int]
    allocations: Dict[str, int]
    erased: Dict[str, int]


def _per_table(store: VHPIStore, pool: str, keys: torch.Tensor) -> Dict[str, int]:
    counts = {name: 0 for name in store.tables_of_pool(pool)}
    for name, mask in store.table_masks(pool, keys):
        counts[name] = int(mask.sum())
    return counts


def apply_decision(
    store: VHPIStore,
    pool: str,
    decision: PruneDecision,
    step: int,
) -> CycleCounts:
    """Evict (if enforced) every live chunk below its threshold, then allocate pruned chunks above
    it, highest utility first, while the pool has free slots. ``decision.thresholds`` is over
    global chunk indices; the pool reads its own range.

    Then, where the pool cannot hold every row (it has a sketch), entries left without a live
    chunk are erased (their utility goes to the sketch, so they can be admitted again). The
    remaining candidates' hash-table scores are set to their row utility, the bar a new id's
    estimate must clear to displace one (``VHPIStore.admit``); entries holding chunks cannot be
    displaced (``VHPIStore.protect``).
    """
    et = store.entries[pool]
    K = store.num_chunks
    tables = store.tables_of_pool(pool)
    off = store.layouts[tables[0]].chunk_offset if tables else 0
    thr = decision.thresholds[off : off + K].to(et.utilities.device)
    et.thresholds.copy_(thr)
    et.rebase(step)  # stored utilities are now as of this step
    entries = et.seen()
    u = et.utilities[entries]
    live = et.chunk_slots[entries] >= 0
    keys = et.keys_of(entries)
    evict = live & (u < thr) if decision.enforce else torch.zeros_like(live)
    rows, ks = evict.nonzero(as_tuple=True)
    store.evict(pool, entries[rows], ks)
    evictions = _per_table(store, pool, keys[rows])
    rows, ks = (~live & (u > thr)).nonzero(as_tuple=True)
    budget = min(store.pools[pool].free_count(), rows.numel())
    # Stable descending sort: ties keep entry order, so runs are reproducible.
    order = torch.sort(u[rows, ks], descending=True, stable=True).indices[:budget]
    rows, ks = rows[order], ks[order]
    store.allocate(pool, entries[rows], ks, step)
    allocations = _per_table(store, pool, keys[rows])
    erased = {name: 0 for name in tables}
    if store.sketches[pool].width:
        empty = ~(et.chunk_slots[entries] >= 0).any(1)
        erased = _per_table(store, pool, keys[empty])
        # Sketch first brought to this step: ``u`` is already decayed to it, and would otherwise
        # be decayed a second time (by gamma ** interval) with the sketch's older contents.
        store.sketches[pool].decay_to(step, store.entries[pool].decay)  # the one decay
        store.erase(pool, entries[empty], u[empty])
        entries, u = entries[~empty], u[~empty]
    et.index.scores[entries] = u.sum(1)
    store.protect(pool, entries)
    return CycleCounts(evictions, allocations, erased)


__all__ = [
    "CycleCounts",
    "PoolSample",
    "apply_decision",
    "count_seen",
    "merge_samples",
    "sample_pool",
]
