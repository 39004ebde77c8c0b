"""One FIITED-2D decision over a module's pools: widths, columns, compaction, optimizer refresh.

Runs from ``FiitedEmbeddingBagCollection.prune_dims`` (at the end of the cold start and at each
revisit, after the backward of that step), never inside forward.
"""

from typing import Any, Dict

import torch

from torchrec_fiited.policy import PoolColumns, global_widths, kept_width, top_columns


def pool_widths(module) -> Dict[str, int]:
    """Stored width cs' of every pool under the module's ``dim_pruning`` scope."""
    store = module.store
    cfg = module.config.dim_pruning
    if cfg.scope == "table":
        return {name: kept_width(pool.chunk_size, cfg.target_ratio) for name, pool in store.pools.items()}
    columns = {
        name: PoolColumns(
            [store.dim_maps[t].utilities for t in store.tables_of_pool(name)],
            pool.capacity,
            pool.chunk_size,
        )
        for name, pool in store.pools.items()
    }
    return global_widths(columns, cfg.target_ratio)


def _choose_columns(store, tables, width: int, shared: bool) -> Dict[str, torch.Tensor]:
    """Each table's best ``width`` columns per chunk, or one set for all by summed utility."""
    if shared:
        common = top_columns(sum(store.dim_maps[t].utilities for t in tables), width)
        return {t: common.clone() for t in tables}
    return {t: top_columns(store.dim_maps[t].utilities, width) for t in tables}


def run_dim_pruning(module) -> Dict[str, Dict[str, Any]]:
    """Decide every table's stored columns now and re-lay out the pools.

    Returns:
        per table: step, D_active, the kept columns per chunk, and how many live chunks got a
        dimension back (re-initialised).
    """
    store = module.store
    step = int(module.steps_done)
    report: Dict[str, Dict[str, Any]] = {}
    for pool, width in pool_widths(module).items():
        tables = store.tables_of_pool(pool)
        kept = _choose_columns(store, tables, width, module.config.dim_pruning.shared_columns)
        if all(torch.equal(kept[t], store.dim_maps[t].kept) for t in tables):
            regrown = {t: 0 for t in tables}  # same columns: keep the tensors as they are
        else:
            regrown = store.restrict_columns(pool, kept, step)
        for t in tables:
            store.dim_maps[t].last_decision_step.fill_(step)
            report[t] = {
                "step": step,
                "active_dim": store.active_dim(t),
                "kept": kept[t].tolist(),
                "regrown_chunks": regrown[t],
            }
    # The pools' tensors were replaced: the fused optimizer must hold the new ones.
    module.fused_optimizer.refresh(store.pools)
    return report
