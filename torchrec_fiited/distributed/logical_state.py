"""state_dict / load_state_dict of a sharded FIITED collection: sparse, per shard.

Keys, per shard of a global table ``t`` at global row ``r`` and column ``c`` (one set per shard
of the plan, held by the rank the plan puts it on), the shard's resident rows in the sparse form
of ``store/logical.py``, padded to the rows its pool can hold (``capacity``):

    embedding_bags.<t>.fiited_shard.<r>_<c>.rows        int64 [cap]     global rows, -1 = padding
    embedding_bags.<t>.fiited_shard.<r>_<c>.weight      fp32  [cap, D_shard]
    embedding_bags.<t>.fiited_shard.<r>_<c>.live        uint8 [cap, K_shard]
    embedding_bags.<t>.fiited_shard.<r>_<c>.utilities   fp32  [cap, K_shard]
    embedding_bags.<t>.fiited_shard.<r>_<c>.last_step   int32 [cap]     the step utilities are as of
    embedding_bags.<t>.fiited_shard.<r>_<c>.scores      fp32  [cap]
    embedding_bags.<t>.fiited_shard.<r>_<c>.momentum    fp32  [cap, K_shard] / [cap, D_shard]
    embedding_bags.<t>.fiited_shard.<r>_<c>.entries     int64 [cap]     hash-table slot of each row
    embedding_bags.<t>.fiited_shard.<r>_<c>.count       int64 []        rows in use
    embedding_bags.<t>.fiited_shard.<r>_<c>.fallback_*  the shard's hashed fallback (miss="hashed")
    fiited_pools.<pool>.<t>.<r>_<c>.sketch_counts, ...  each local pool's utility sketch and
                                                        counters (named by its first shard)
    steps_done                                          int64 []        replicated

Every tensor is sized by the budget (the pools' entries and sketches), none by num_embeddings.
They are plain tensors, each on the rank holding its shard: ``torch.distributed.checkpoint``
saves each from its rank and loads it back into the same plan, bitwise (rows go back to their
hash-table entries). Loading into another plan or world size (resharding) is issue 13: it works
where the new plan has the same shards with the same pool sizes (e.g. table-wise on fewer ranks
with per-table pools); DCP refuses other plans, their keys or shapes being different.

``load_state_dict`` also takes the plan-independent form (``gather.logical_tables`` of an
unsharded module, or a gathered sharded state): each rank takes its shards' rows, columns and
chunks, and its pools keep their sketches.
"""

from collections import OrderedDict
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch.nn.modules.module import _IncompatibleKeys

from torchrec_fiited.store.logical import (
    capacity,
    export_table,
    fallback_state,
    fallback_state_errors,
    fields,
    import_errors,
    import_tables,
    load_fallback_state,
    load_pool_state,
    pad,
    pool_state,
    pool_state_errors,
    select_logical,
    state_key,
    unpad,
)


def shard_key_prefix(table: str, start: int, col: int) -> str:
    """Key prefix of a shard of global ``table`` at first global row (or start of its hash
    range) ``start`` and first column ``col`` (``gather.SHARD_KEY`` parses it back)."""
    return f"embedding_bags.{table}.fiited_shard.{start}_{col}."


def shard_prefix(layout) -> str:
    """Key prefix of a local table's shard."""
    col = layout.chunk_offset * layout.chunk_size
    return shard_key_prefix(layout.logical_name, layout.shard_start, col)


def pool_prefix(store, pool: str) -> str:
    """Key prefix of a local pool's state, named by the pool and its first shard."""
    first = store.layouts[store.tables_of_pool(pool)[0]]
    col = first.chunk_offset * first.chunk_size
    return f"fiited_pools.{pool}.{first.logical_name}.{first.shard_start}_{col}."


class LogicalStateMixin:
    """Mixed into ``ShardedFiitedEmbeddingBagCollection``; uses its ``_lookups``, ``_tables``,
    ``_config`` and ``_coordinator``."""

    def _errors_of_all_ranks(self, errors: List[str]) -> List[str]:
        return _rank_errors(self._coordinator.group, errors)

    def _state_keys(self) -> List[str]:
        """The keys ``state_dict`` gives on this rank (without building its tensors)."""
        keys = []
        for lookup in self._lookups:
            store = lookup.store
            for name, layout in store.layouts.items():
                base = shard_prefix(layout)
                keys += [base + f for f in fields(store.optimizer) + ["entries", "count"]]
                if name in store.fallbacks:
                    keys += [base + "fallback_weights", base + "fallback_momentum"]
            for pool in store.pools:
                keys += [pool_prefix(store, pool) + f for f in pool_state(store, pool)]
        return keys + ["steps_done"]

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        destination = OrderedDict() if destination is None else destination
        for lookup in self._lookups:
            store = lookup.store
            for name, layout in store.layouts.items():
                base = prefix + shard_prefix(layout)
                form = pad(export_table(store, name), capacity(store, name))
                for field, tensor in {**form, **fallback_state(store, name)}.items():
                    destination[base + field] = tensor
            for pool in store.pools:
                for field, tensor in pool_state(store, pool).items():
                    destination[prefix + pool_prefix(store, pool) + field] = tensor
        destination[prefix + "steps_done"] = torch.tensor(self.steps_done, dtype=torch.int64)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this plan's own state (bitwise) or the plan-independent form (each rank takes
        its shards' part). All ranks load or none does: a problem on any rank, named by rank,
        table and pool, fails every rank with the store unchanged.

        Raises:
            ValueError: missing or unexpected keys (``strict``), a bad field, or a pool without
                room for the rows or live chunks given to it.
        """
        plan_independent = any(k.endswith(".fiited_rows") for k in state_dict)
        if plan_independent:
            expected = {state_key(t.name, f) for t in self._tables
                        for f in fields(self._config.optimizer)} | {"steps_done"}
        else:
            expected = set(self._state_keys())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint does not match this sharded FIITED collection: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        errors: List[str] = []
        loads = []
        for lookup in self._lookups:
            if plan_independent:
                tables, errs = select_logical(lookup.store, state_dict)
                pools, fallbacks = {}, {}
            else:
                tables, pools, fallbacks, errs = _own_state(lookup.store, state_dict)
            errors += errs
            if not errs:
                errors += import_errors(lookup.store, tables)
            loads.append((lookup, tables, pools, fallbacks))
        # All ranks load or none does: a rank whose shard does not fit fails every rank.
        errors = self._errors_of_all_ranks(errors)
        if errors:
            raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
        steps = state_dict.get("steps_done")
        for lookup, tables, pools, fallbacks in loads:
            import_tables(lookup.store, tables)
            for pool, state in pools.items():
                load_pool_state(lookup.store, pool, state)
            for table, state in fallbacks.items():
                load_fallback_state(lookup.store, table, state)
            if steps is not None:
                lookup.steps_done.fill_(int(steps))
        return _IncompatibleKeys(missing, unexpected)


def _own_state(store, state_dict):
    """This store's tables, pools and fallbacks from a state in this plan's own form (absent
    keys are skipped; ``strict`` decides about them), and what is wrong with them."""
    tables: Dict[str, Dict[str, torch.Tensor]] = {}
    pools: Dict[str, Dict[str, torch.Tensor]] = {}
    fallbacks: Dict[str, Dict[str, torch.Tensor]] = {}
    errors: List[str] = []
    for name, layout in store.layouts.items():
        base = shard_prefix(layout)
        names = fields(store.optimizer) + ["entries", "count"]
        got = {f: state_dict[base + f] for f in names if base + f in state_dict}
        if len(got) == len(names):
            try:
                tables[name] = unpad(got, f"table {layout.logical_name!r} shard {base[:-1]!r}")
            except ValueError as e:
                errors.append(str(e))
        elif got:
            errors.append(f"table {layout.logical_name!r}: shard {base[:-1]!r} lacks "
                          f"{sorted(set(names) - set(got))}")
        mine = fallback_state(store, name)
        theirs = {f: state_dict[base + f] for f in mine if base + f in state_dict}
        if theirs:
            errors += fallback_state_errors(store, name, theirs)
            fallbacks[name] = theirs
    for pool in store.pools:
        base = pool_prefix(store, pool)
        mine = pool_state(store, pool)
        theirs = {f: state_dict[base + f] for f in mine if base + f in state_dict}
        if theirs:
            errors += pool_state_errors(store, pool, theirs)
            pools[pool] = theirs
    return tables, pools, fallbacks, errors


def _rank_errors(group, errors: List[str]) -> List[str]:
    if not dist.is_initialized():
        return errors
    every: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, errors, group=group)
    return [f"rank {r}: {e}" for r, errs in enumerate(every) for e in errs]
