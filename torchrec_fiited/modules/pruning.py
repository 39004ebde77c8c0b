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
    counts = {key: 0 for key in logical}
    for m, pool, key in local:
        counts[key] += count_seen(m.store, pool)
    counts = coordinator.sum_counts(counts)
    samples: Dict[str, list] = {key: [] for key in logical}
    for m, pool, key in local:
        samples[key].append(sample_pool(m.store, m._rule, pool, cfg.sample_size, step, counts[key]))
    samples = coordinator.gather(samples)
    decisions, report = {}, {}
    for key in sorted(logical):
        capacity, policy = logical[key]
        utilities, live = merge_samples(samples[key], policy.num_chunks)
        d = policy.decide(utilities, live, capacity, counts[key])
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
        done = apply_decision(m.store, m._rule, pool, decisions[key], step)
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
