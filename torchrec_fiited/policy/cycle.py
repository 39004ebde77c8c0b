"""One pruning cycle over a pool: sample, decide, then evict and allocate.

The phases are separate so that a coordinator (``policy/coordinator.py``) can gather the samples
of every rank between ``sample_pool`` and ``ThresholdPolicy.decide``, and then let each rank run
``apply_decision`` on its own shard. Samples carry plan-independent row keys and global chunk
indices, so the merged sample, and with it every threshold, is the same whatever the plan.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from torchrec_fiited.policy.thresholds import PruneDecision
from torchrec_fiited.policy.utility import UtilityRule
from torchrec_fiited.store.layout import counter_uniform, row_keys
from torchrec_fiited.store.vhpi import VHPIStore

# Keys the sampling draws apart from the init draws, which use the same counter generator.
_SAMPLE_SALT = 0x5A4D


@dataclass
class PoolSample:
    """Utilities of the chunks of sampled entries of one (local) pool.

    Args:
        utilities: fp32 [m, K_local], decayed to the cycle's step.
        live: bool [m, K_local].
        row_keys: int64 [m], ``store.layout.row_keys`` of each sampled entry.
        chunk_offset: global chunk index of column 0 (column-wise shards hold a chunk range).
    """

    utilities: torch.Tensor
    live: torch.Tensor
    row_keys: torch.Tensor
    chunk_offset: int


def count_seen(store: VHPIStore, pool: str) -> int:
    """Seen entries of ``pool``'s tables, counting a row once even when its chunks are spread
    over column shards (only the shard holding chunk 0 counts it)."""
    return sum(
        int(store.tables[name].num_seen)
        for name in store.tables_of_pool(pool)
        if store.layouts[name].chunk_offset == 0
    )


def sample_pool(
    store: VHPIStore, rule: UtilityRule, pool: str, m: int, step: int, num_seen_total: int
) -> PoolSample:
    """Sample each seen entry of ``pool``'s tables with probability m / num_seen_total.

    Whether an entry is drawn depends only on (seed, logical table, global row, step), so every
    column shard of a row draws it alike and the union over ranks is the single-process sample.
    """
    p = min(1.0, m / max(1, num_seen_total))
    parts_u, parts_live, parts_keys = [], [], []
    offsets = {store.layouts[name].chunk_offset for name in store.tables_of_pool(pool)}
    if len(offsets) > 1:
        raise RuntimeError(f"[torchrec_fiited] pool {pool!r} mixes chunk offsets {offsets}")
    for name in store.tables_of_pool(pool):
        et, layout = store.tables[name], store.layouts[name]
        entries = et.seen()
        keys = row_keys(layout.logical_name, entries + layout.row_offset)
        if p < 1.0:
            draw = counter_uniform([store.seed, _SAMPLE_SALT, keys, step])
            picked = draw < p
            entries, keys = entries[picked], keys[picked]
        parts_u.append(rule.decayed(et.utilities[entries], et.last_step[entries], step))
        parts_live.append(et.chunk_slots[entries] >= 0)
        parts_keys.append(keys)
    K = store.num_chunks
    device = store.pools[pool].weights.device
    return PoolSample(
        torch.cat(parts_u) if parts_u else torch.zeros(0, K, device=device),
        torch.cat(parts_live) if parts_live else torch.zeros(0, K, dtype=torch.bool, device=device),
        torch.cat(parts_keys) if parts_keys else torch.zeros(0, dtype=torch.int64, device=device),
        offsets.pop() if offsets else 0,
    )


def merge_samples(parts: Sequence[PoolSample], num_chunks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One [R, K] utility matrix (fp32) and live mask (bool) from samples of any plan.

    Rows are the distinct sampled row keys in ascending order; a part fills the chunk columns it
    holds. Thresholds are order-free (quantiles, counts), so any plan gives the same decision.
    """
    parts = [p for p in parts if p.row_keys.numel()]
    if not parts:
        return torch.zeros(0, num_chunks), torch.zeros(0, num_chunks, dtype=torch.bool)
    keys = torch.unique(torch.cat([p.row_keys.cpu() for p in parts]))
    u = torch.zeros(keys.numel(), num_chunks)
    live = torch.zeros(keys.numel(), num_chunks, dtype=torch.bool)
    for p in parts:
        rows = torch.searchsorted(keys, p.row_keys.cpu())
        cols = slice(p.chunk_offset, p.chunk_offset + p.utilities.shape[1])
        u[rows, cols] = p.utilities.cpu()
        live[rows, cols] = p.live.cpu()
    return u, live


@dataclass
class CycleCounts:
    """Evictions and allocations of one cycle, per table."""

    evictions: Dict[str, int]
    allocations: Dict[str, int]


def apply_decision(
    store: VHPIStore,
    rule: UtilityRule,
    pool: str,
    decision: PruneDecision,
    step: int,
) -> CycleCounts:
    """Evict (if enforced) every live chunk below its threshold, then allocate pruned chunks above
    it, highest utility first, while the pool has free slots. ``decision.thresholds`` is over
    global chunk indices; each table reads its own range."""
    device = store.pools[pool].weights.device
    K = store.num_chunks
    evictions: Dict[str, int] = {}
    candidates: List[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name in store.tables_of_pool(pool):
        et = store.tables[name]
        off = store.layouts[name].chunk_offset
        thr = decision.thresholds[off : off + K].to(device)
        entries = et.seen()
        u = rule.decayed(et.utilities[entries], et.last_step[entries], step)
        live = et.chunk_slots[entries] >= 0
        evict = live & (u < thr) if decision.enforce else torch.zeros_like(live)
        rows, ks = evict.nonzero(as_tuple=True)
        store.evict(name, entries[rows], ks)
        evictions[name] = rows.numel()
        rows, ks = (~live & (u > thr)).nonzero(as_tuple=True)
        candidates.append((name, entries[rows], ks, u[rows, ks]))
    allocations = _allocate_best(store, pool, candidates, step)
    return CycleCounts(evictions, allocations)


def _allocate_best(store, pool, candidates, step) -> Dict[str, int]:
    if not candidates:
        return {}
    utilities = torch.cat([c[3] for c in candidates])
    budget = min(store.pools[pool].free_count(), utilities.numel())
    # Stable descending sort: ties keep table order, then entry order, so runs are reproducible.
    order = torch.sort(utilities, descending=True, stable=True).indices[:budget]
    owner = torch.cat(
        [torch.full((c[3].numel(),), i, dtype=torch.int64) for i, c in enumerate(candidates)]
    ).to(order.device)[order]
    flat_entries = torch.cat([c[1] for c in candidates])[order]
    flat_ks = torch.cat([c[2] for c in candidates])[order]
    allocations: Dict[str, int] = {}
    for i, (name, _, _, _) in enumerate(candidates):
        mine = owner == i
        store.allocate(name, flat_entries[mine], flat_ks[mine], step)
        allocations[name] = int(mine.sum())
    return allocations


__all__ = [
    "CycleCounts",
    "PoolSample",
    "apply_decision",
    "count_seen",
    "merge_samples",
    "sample_pool",
]
