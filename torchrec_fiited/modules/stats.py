"""``FiitedEmbeddingBagCollection.stats()``: occupancy, thresholds and bytes by component."""

from typing import Any, Dict

import torch

from torchrec_fiited.store.sizing import full_table_bytes

# Component of each tensor of the module, by the prefix of its state-dict name. The components
# sum to the bytes of every tensor the module holds (a tensor matching none is "other").
_COMPONENTS = (
    ("store.pools.", ".weights", "chunks"),
    ("store.pools.", ".momentum", "optimizer"),
    ("store.pools.", "", "free_stacks"),
    ("store.entries.", "", "entries"),
    ("store.sketches.", "", "sketch"),
    ("store.fallbacks.", "", "fallback"),
    ("store.dim_maps.", "", "dim_maps"),
)


def _component(name: str) -> str:
    for prefix, suffix, component in _COMPONENTS:
        if name.startswith(prefix) and name.endswith(suffix):
            return component
    return "other"


def collect(module) -> Dict[str, Any]:
    store = module.store
    K = store.num_chunks
    total = {c: 0 for _, _, c in _COMPONENTS}
    total["other"] = 0
    for name, t in list(module.named_buffers()) + list(module.named_parameters()):
        total[_component(name)] += t.numel() * t.element_size()
    total["total"] = sum(total.values())
    tables: Dict[str, Any] = {}
    full = 0
    cycle_tables = {
        t: c for report in module._last_cycle.values() for t, c in report.get("tables", {}).items()
    }
    for name, layout in store.layouts.items():
        et = store.entries_of(name)
        entries = store.table_entries(name)
        live_mask = et.chunk_slots[entries] >= 0
        live = live_mask.sum(0).tolist()
        seen = entries.numel()
        # Resident rows by how many of their K chunks are live: [rows with 0, 1, ..., K live].
        rows_by_live = torch.bincount(live_mask.sum(1), minlength=K + 1).tolist()
        full += full_table_bytes(layout.num_rows, layout.dim, store.optimizer)
        width = store.pool_of(name).stored_width
        last = cycle_tables.get(name, {})
        tables[name] = {
            "pool": layout.pool,
            "num_embeddings": layout.num_entries,
            "entries_seen": seen,  # resident entries
            "dim": layout.dim,
            "active_dim": K * width,  # D_active: < dim once FIITED-2D pruned dimensions
            **_dims(store, name),
            "live_chunks": live,
            "rows_by_live_chunks": rows_by_live,
            "chunk_prune_ratios": [1.0 - n / seen if seen else 0.0 for n in live],
            "evictions_last_cycle": int(last.get("evictions", 0)),
            "allocations_last_cycle": int(last.get("allocations", 0)),
            "erased_last_cycle": int(last.get("erased", 0)),
            "fallback_rows": store.fallbacks[name].rows if name in store.fallbacks else 0,
            "bytes": {"pools_live": sum(live) * width * 4},
        }
    pools: Dict[str, Any] = {}
    for name, pool in store.pools.items():
        policy = module._policies[name]
        et = store.entries[name]
        pools[name] = {
            "tables": store.tables_of_pool(name),
            "capacity": pool.capacity,
            "entry_capacity": et.capacity,
            "resident_entries": int(et.num_seen),
            "sketch_width": store.sketches[name].width,
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
                "entries": sum(b.numel() * b.element_size() for b in et.buffers()),
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
