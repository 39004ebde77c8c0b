"""``FiitedEmbeddingBagCollection.stats()``: occupancy, thresholds and bytes by component."""

from typing import Any, Dict

import torch

# Buffers named by these suffixes are the chunk pools and the optimizer state; every other
# tensor of the module is metadata (entries, free stacks, counters).
POOL_SUFFIX = ".weights"
OPTIMIZER_SUFFIX = ".momentum"


def _component(name: str) -> str:
    if name.startswith("store.pools.") and name.endswith(POOL_SUFFIX):
        return "pools"
    if name.startswith("store.pools.") and name.endswith(OPTIMIZER_SUFFIX):
        return "optimizer"
    return "metadata"


def collect(module) -> Dict[str, Any]:
    store = module.store
    K = store.num_chunks
    total = {"pools": 0, "optimizer": 0, "metadata": 0}
    for name, t in list(module.named_buffers()) + list(module.named_parameters()):
        total[_component(name)] += t.numel() * t.element_size()
    total["total"] = sum(total.values())
    tables: Dict[str, Any] = {}
    full = 0
    for name, layout in store.layouts.items():
        et = store.tables[name]
        live_mask = et.chunk_slots >= 0
        live = live_mask.sum(0).tolist()
        seen = int(et.num_seen)
        # Seen rows by how many of their K chunks are live: [rows with 0, 1, ..., K live].
        per_row = live_mask[et.seen()].sum(1)
        rows_by_live = torch.bincount(per_row, minlength=K + 1).tolist()
        full += layout.num_entries * layout.dim * 4
        width = store.pool_of(name).stored_width
        tables[name] = {
            "pool": layout.pool,
            "num_embeddings": layout.num_entries,
            "entries_seen": seen,
            "dim": layout.dim,
            "active_dim": K * width,  # D_active: < dim once FIITED-2D pruned dimensions
            **_dims(store, name),
            "live_chunks": live,
            "rows_by_live_chunks": rows_by_live,
            "chunk_prune_ratios": [1.0 - n / seen if seen else 0.0 for n in live],
            "evictions_last_cycle": int(et.last_cycle_evictions),
            "allocations_last_cycle": int(et.last_cycle_allocations),
            "bytes": {
                "pools_live": sum(live) * width * 4,
                "metadata": sum(b.numel() * b.element_size() for b in et.buffers()),
            },
        }
    pools: Dict[str, Any] = {}
    for name, pool in store.pools.items():
        policy = module._policies[name]
        pools[name] = {
            "tables": store.tables_of_pool(name),
            "capacity": pool.capacity,
            "chunk_size": pool.chunk_size,
            "stored_chunk_size": pool.stored_width,
            "free_slots": pool.free_count(),
            "live_per_chunk": pool.live_per_chunk.tolist(),
            "target_chunk_prune_ratios": list(getattr(policy, "ratios", [])),
            "logical_pool": module._logical_of[name],
            "last_cycle": module._last_cycle.get(module._logical_of[name], {}),
            "bytes": {
                "pools": pool.weights.numel() * pool.weights.element_size(),
                "optimizer": pool.momentum.numel() * pool.momentum.element_size(),
            },
        }
    return {
        "step": int(module.steps_done),
        "num_chunks": K,
        "tables": tables,
        "pools": pools,
        "bytes": total,
        "bytes_full": full,
    }


def _dims(store, table: str) -> Dict[str, Any]:
    """FIITED-2D state of ``table``: kept columns per chunk and its last decision (if any)."""
    if table not in store.dim_maps:
        return {}
    dm = store.dim_maps[table]
    return {
        "dims_kept": dm.kept.tolist(),
        "dim_decision_step": int(dm.last_decision_step),
    }
