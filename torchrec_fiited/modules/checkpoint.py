"""Checkpoint state of a FiitedEmbeddingBagCollection and its strict validation on load.

Loading is all-or-nothing for the module: the pre-hook checks keys, shapes, dtypes, the
configuration and the store's invariants of the incoming state (``VHPIStore.invariant_errors``:
slots, resident keys and their buckets, the null entry, counters) before any tensor is copied.
The state is budget-sized (store v2): per pool the resident keys' hash table and entries, the
chunk pool and the utility sketch; nothing per row of the id space.

Under FIITED-2D the pools' widths change during training, so a pool's expected shape follows
the incoming column map (``store.dim_maps.<table>.kept``, int64 [K, cs']); once everything is
checked, the module's pools are re-shaped to it and the load copies into them.
"""

import dataclasses
from typing import Any, Dict, List

import torch

from torchrec_fiited.config import DimPruningConfig
from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES
from torchrec_fiited.store.dim_map import kept_errors

EXTRA = "_extra_state"
# Config fields added after checkpoints were written: a checkpoint without one had the default.
_ADDED_FIELDS = {"dim_pruning": dataclasses.asdict(DimPruningConfig())}


def extra_state(module) -> Dict[str, Any]:
    """Non-tensor state: what the checkpoint was made with and the last cycle. There is no RNG
    state: initial values and samples come from a counter-based generator (``store.layout``)."""
    return {
        "config": module.config.to_dict(),
        "tables": _table_signature(module),
        "last_cycle": dict(module._last_cycle),
    }


def _table_signature(module) -> List[List[Any]]:
    return [
        [t.name, t.num_embeddings, t.embedding_dim, str(t.pooling), list(t.feature_names)]
        for t in module.embedding_bag_configs()
    ]


def validate_before_load(module, state_dict, prefix, *args: Any) -> None:
    """Raise ``ValueError`` (naming the key or table) unless ``state_dict`` fits ``module``."""
    own = module.state_dict()
    incoming = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if EXTRA in incoming:  # another config explains missing keys (e.g. dim maps) best
        _check_extra(own[EXTRA], incoming[EXTRA])
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match this FiitedEmbeddingBagCollection: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    widths = _incoming_widths(module, incoming, prefix)
    shapes = _expected_shapes(module, own, widths)
    for key, mine in own.items():
        if key == EXTRA:
            continue
        theirs = incoming[key]
        want = shapes.get(key, tuple(mine.shape))
        if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != want or theirs.dtype != mine.dtype:
            got = (tuple(theirs.shape), theirs.dtype) if isinstance(theirs, torch.Tensor) else type(theirs)
            raise ValueError(
                f"checkpoint key {prefix + key!r}: expected {want} {mine.dtype}, got {got}"
            )
    store_state = {k[len("store."):]: v for k, v in incoming.items() if k.startswith("store.")}
    errors = module.store.invariant_errors(store_state) + _value_errors(module, incoming, prefix)
    if int(incoming["steps_done"]) < 0:
        errors.append(f"steps_done={int(incoming['steps_done'])} is negative")
    if errors:
        raise ValueError("corrupt FIITED checkpoint: " + "; ".join(errors))
    _reshape_pools(module, widths)


def _value_errors(module, incoming, prefix: str) -> List[str]:
    """Values the store's invariants do not cover but a later step would trip on: NaN hash-table
    scores (compared at admission; the table would reject them only after other tensors were
    copied) and sketch counts that are not finite and >= 0 (they become admission scores)."""
    errors: List[str] = []
    for pool in module.store.pools:
        key = f"store.entries.{pool}.index.scores"
        if bool(torch.isnan(incoming[key]).any()):
            errors.append(f"key {prefix + key!r} holds NaN (hash-table scores are compared)")
        key = f"store.sketches.{pool}.counts"
        counts = incoming[key]
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            errors.append(f"key {prefix + key!r}: sketch counts must be finite and >= 0")
    return errors


def _incoming_widths(module, incoming, prefix: str) -> Dict[str, int]:
    """Stored width of every FIITED-2D pool in the checkpoint, from its first table's column map."""
    store = module.store
    widths: Dict[str, int] = {}
    for pool in store.pools:
        tables = [t for t in store.tables_of_pool(pool) if t in store.dim_maps]
        if not tables:
            continue
        key = f"store.dim_maps.{tables[0]}.kept"
        problem = kept_errors(incoming[key], store.num_chunks, store.pools[pool].chunk_size)
        if problem is not None:
            raise ValueError(f"corrupt FIITED checkpoint: key {prefix + key!r} {problem}")
        widths[pool] = int(incoming[key].shape[1])
    return widths


def _expected_shapes(module, own, widths: Dict[str, int]) -> Dict[str, tuple]:
    """Shapes that differ from the module's own: pools (and column maps) at the incoming width."""
    store = module.store
    shapes: Dict[str, tuple] = {}
    for pool, w in widths.items():
        p = store.pools[pool]
        shapes[f"store.pools.{pool}.weights"] = (p.capacity, w)
        shapes[f"store.pools.{pool}.momentum"] = tuple(OPTIMIZER_STATE_SHAPES[p.optimizer](p.capacity, w))
        for t in store.tables_of_pool(pool):
            shapes[f"store.dim_maps.{t}.kept"] = (store.num_chunks, w)
    return shapes


def reshape_to(module, shapes) -> None:
    """``FiitedEmbeddingBagCollection.shape_like``: pools at the widths of the kept maps in
    ``shapes`` (state-dict key -> shape)."""
    store = module.store
    widths: Dict[str, int] = {}
    for pool, p in store.pools.items():
        got = {tuple(shapes[k])[-1] for t in store.tables_of_pool(pool)
               if (k := f"store.dim_maps.{t}.kept") in shapes}
        if not got:
            continue
        if len(got) > 1 or not 1 <= min(got) <= p.chunk_size:
            raise ValueError(
                f"pool {pool!r}: its tables' column maps must share one width in [1, "
                f"{p.chunk_size}], got {sorted(got)}"
            )
        widths[pool] = got.pop()
    _reshape_pools(module, widths)


def _reshape_pools(module, widths: Dict[str, int]) -> None:
    """Give each FIITED-2D pool the checkpoint's width (the load then fills the new tensors)."""
    store = module.store
    changed = False
    for pool, w in widths.items():
        p = store.pools[pool]
        if p.stored_width == w:
            continue
        shape = OPTIMIZER_STATE_SHAPES[p.optimizer](p.capacity, w)
        p.replace_storage(p.weights.new_zeros(p.capacity, w), p.momentum.new_zeros(shape))
        for t in store.tables_of_pool(pool):
            dm = store.dim_maps[t]
            dm.kept = dm.kept.new_zeros(store.num_chunks, w)
        changed = True
    if changed:
        module.fused_optimizer.refresh(store.pools)


def _check_extra(mine: Dict[str, Any], theirs: Any) -> None:
    if not isinstance(theirs, dict) or not {"config", "tables", "last_cycle"} <= set(theirs):
        raise ValueError("corrupt FIITED checkpoint: _extra_state lacks config/tables/last_cycle")
    if theirs["tables"] != mine["tables"]:
        raise ValueError(
            f"checkpoint tables differ from this module's: {theirs['tables']} vs {mine['tables']}"
        )
    got = {**_ADDED_FIELDS, **theirs["config"]}
    diffs = [f"{k}: {got.get(k)!r} vs {v!r}" for k, v in mine["config"].items() if got.get(k) != v]
    if diffs:
        raise ValueError(
            "checkpoint is from another FiitedConfig (checkpoint vs module): " + ", ".join(diffs)
        )
