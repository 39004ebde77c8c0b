"""One pruning cycle over a pool: sample, decide, then evict and allocate.

The three phases are separate so that a distributed coordinator can all-gather the samples of
every rank between ``sample_pool`` and ``ThresholdPolicy.decide``, and then let each rank run
``apply_decision`` on its own shard.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from torchrec_fiited.policy.thresholds import PruneDecision
from torchrec_fiited.policy.utility import UtilityRule
from torchrec_fiited.store.vhpi import VHPIStore


@dataclass
class PoolSample:
    """Utilities of chunks sampled from one pool.

    Args:
        utilities: fp32 [m, K], decayed to the cycle's step.
        live: bool [m, K].
        num_seen: entries seen across the pool's tables (the population sampled).
    """

    utilities: torch.Tensor
    live: torch.Tensor
    num_seen: int


def sample_pool(
    store: VHPIStore, rule: UtilityRule, pool: str, m: int, step: int, gen: torch.Generator
) -> PoolSample:
    """Sample ``m`` seen entries of ``pool``'s tables uniformly (all of them when fewer)."""
    parts_u: List[torch.Tensor] = []
    parts_live: List[torch.Tensor] = []
    seen = [(name, store.tables[name].seen()) for name in store.tables_of_pool(pool)]
    total = sum(s.numel() for _, s in seen)
    if total > m:
        picks = torch.randint(0, total, (m,), generator=gen, device=gen.device).sort().values
    offset = 0
    for name, all_entries in seen:
        entries = all_entries
        if total > m:
            lo = torch.searchsorted(picks, offset)
            hi = torch.searchsorted(picks, offset + all_entries.numel())
            entries = all_entries[picks[lo:hi] - offset]
        offset += all_entries.numel()
        et = store.tables[name]
        parts_u.append(rule.decayed(et.utilities[entries], et.last_step[entries], step))
        parts_live.append(et.chunk_slots[entries] >= 0)
    K = store.num_chunks
    return PoolSample(
        torch.cat(parts_u) if parts_u else torch.zeros(0, K),
        torch.cat(parts_live) if parts_live else torch.zeros(0, K, dtype=torch.bool),
        total,
    )


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
    gen: torch.Generator,
) -> CycleCounts:
    """Evict (if enforced) every live chunk below its threshold, then allocate pruned chunks above
    it, highest utility first, while the pool has free slots."""
    thr = decision.thresholds.to(store.pools[pool].weights.device)
    evictions: Dict[str, int] = {}
    candidates: List[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name in store.tables_of_pool(pool):
        et = store.tables[name]
        entries = et.seen()
        u = rule.decayed(et.utilities[entries], et.last_step[entries], step)
        live = et.chunk_slots[entries] >= 0
        evict = live & (u < thr) if decision.enforce else torch.zeros_like(live)
        rows, ks = evict.nonzero(as_tuple=True)
        store.evict(name, entries[rows], ks)
        evictions[name] = rows.numel()
        rows, ks = (~live & (u > thr)).nonzero(as_tuple=True)
        candidates.append((name, entries[rows], ks, u[rows, ks]))
    allocations = _allocate_best(store, pool, candidates, gen)
    return CycleCounts(evictions, allocations)


def _allocate_best(store, pool, candidates, gen) -> Dict[str, int]:
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
        store.allocate(name, flat_entries[mine], flat_ks[mine], gen)
        allocations[name] = int(mine.sum())
    return allocations
