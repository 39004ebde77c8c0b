"""A pruning cycle over one or more FIITED collections that share a logical set of pools.

Unsharded, that is one module and a ``LocalCoordinator``. Sharded, it is every local lookup of
a rank, with a ``ProcessGroupCoordinator``: each rank calls ``run_cycle`` at the same step, so
the collectives line up and every rank decides from the same gathered sample.
"""

from typing import Any, Dict, List

from torchrec_fiited.policy import (
    PruneCoordinator,
    apply_decision,
    count_seen,
    merge_samples,
    sample_pool,
)


def run_cycle(modules: List[Any], coordinator: PruneCoordinator) -> Dict[str, Dict[str, Any]]:
    """Sample, decide per logical pool, then evict and allocate in every module's local pools.

    Args:
        modules: ``FiitedEmbeddingBagCollection``s planned from the same global tables and
            config, at the same ``steps_done``.
        coordinator: how the counts and samples of all shards are combined.

    Returns:
        what each logical pool decided: step, thresholds, keep fractions, churn, enforced.
    """
    first = modules[0]
    logical = first._logical
    cfg = first.config
    step = int(first.steps_done)
    local = [(m, pool, m._logical_of[pool]) for m in modules for pool in m.store.pools]
    # Per logical pool: resident entries per chunk range and slots, summed over the plan's
    # pools (every rank sends the same keys). Unsharded, that is the pool's own count and
    # capacity; column shards each admit rows, so a row counts in the largest chunk range.
    K = cfg.num_chunks
    tally = {f"{key}|{k}": 0 for key in logical for k in range(K)}
    tally.update({f"{key}|slots": 0 for key in logical})
    for m, pool, key in local:
        offset, seen, slots = count_seen(m.store, pool)
        for k in range(offset, offset + m.store.num_chunks):
            tally[f"{key}|{k}"] += seen
        tally[f"{key}|slots"] += slots
    tally = coordinator.sum_counts(tally)
    seen_per_chunk = {key: [tally[f"{key}|{k}"] for k in range(K)] for key in logical}
    counts = {key: max(seen_per_chunk[key]) for key in logical}
    slots = {key: tally[f"{key}|slots"] for key in logical}
    samples: Dict[str, list] = {key: [] for key in logical}
    for m, pool, key in local:
        samples[key].append(sample_pool(m.store, pool, cfg.sample_size, step, counts[key]))
    samples = coordinator.gather(samples)
    decisions, report = {}, {}
    for key in sorted(logical):
        # The plan's slots: the logical pool's where a pool holds whole tables; the sum of
        # the shards' pools otherwise (each sized to its share of the budget).
        _, policy = logical[key]
        capacity = slots[key]
        utilities, live, present = merge_samples(samples[key], policy.num_chunks)
        d = policy.decide(utilities, live, capacity, counts[key], present, seen_per_chunk[key])
        decisions[key] = d
        report[key] = {
            "step": step,
            "thresholds": d.thresholds.tolist(),
            "keep_fractions": d.keep_fractions.tolist(),
            "churn": d.churn,
            "enforced": d.enforce,
            "num_seen": counts[key],
            "num_sampled": int(utilities.shape[0]),
        }
    for m, pool, key in local:
        done = apply_decision(m.store, pool, decisions[key], step)
        et = m.store.entries[pool]
        et.last_cycle_evictions.fill_(sum(done.evictions.values()))
        et.last_cycle_allocations.fill_(sum(done.allocations.values()))
        report[key].setdefault("tables", {}).update(
            {
                t: {"evictions": done.evictions[t], "allocations": done.allocations[t],
                    "erased": done.erased[t]}
                for t in done.evictions
            }
        )
    for m in modules:
        m._last_cycle = dict(report)
    return report
