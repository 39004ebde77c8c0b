"""Plan-independent views of a FIITED collection's state: each logical table's resident rows
(``store/logical.py``'s sparse form, merged over its shards) in one process."""

import logging
import re
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_fiited.distributed.fallback_pieces import assemble_fallbacks, held_pieces
from torchrec_fiited.store.logical import (
    export_logical,
    import_tables,
    load_fallback_state,
    merge_shards,
    select_logical,
    state_key,
    unpad,
)

log = logging.getLogger(__name__)

# Keys of a sharded collection's state_dict (``distributed/logical_state.py``).
SHARD_KEY = re.compile(r"^(.*)embedding_bags\.([^.]+)\.fiited_shard\.(\d+)_(\d+)\.(\w+)$")
POOL_KEY = re.compile(r"^(.*)fiited_pools\.")
_FORM_FIELDS = ("rows", "weight", "live", "utilities", "last_step", "scores", "momentum", "count")


def logical_tables(module) -> Dict[str, torch.Tensor]:
    """An unsharded ``FiitedEmbeddingBagCollection``'s plan-independent state: per table its
    resident rows, ascending (``embedding_bags.<t>.fiited_rows``, ``.weight``, ...), and
    ``steps_done``. What a gathered sharded ``state_dict`` is, for the same training."""
    out = export_logical(module.store)
    out["steps_done"] = module.steps_done.clone()
    return out


def gather_state_dict(state_dict, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Whole tensors of a sharded ``state_dict`` on rank ``dst`` (every rank must call this);
    other ranks get None. FIITED tables arrive in the plan-independent form (their shards'
    resident rows merged, as ``logical_tables`` gives them); the per-rank pool state (sketches)
    is left out, it belongs to the plan. Other plain tensors are taken from ``dst``."""
    rank = dist.get_rank()
    out: Dict[str, torch.Tensor] = {}
    shards: Dict[tuple, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = SHARD_KEY.match(key)
        if match:
            prefix, table, row, col, field = match.groups()
            if field in _FORM_FIELDS:
                shards.setdefault((prefix, table, int(row), int(col)), {})[field] = value
        elif POOL_KEY.match(key):
            continue
        elif isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full
        elif rank == dst:
            out[key] = value
    local = {
        k: {f: t.detach().cpu() for f, t in unpad(form, f"table {k[1]!r}").items()}
        for k, form in shards.items()
    }
    every: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    if rank != dst:
        return None
    parts: Dict[tuple, List[tuple]] = {}
    for (prefix, table, row, col), form in sorted(
        (k, v) for per_rank in every for k, v in per_rank.items()
    ):
        parts.setdefault((prefix, table), []).append((col, form))
    for (prefix, table), table_parts in parts.items():
        for field, t in merge_shards(table_parts).items():
            out[prefix + state_key(table, field)] = t
    return out


def load_logical_tables(module, state: Dict[str, torch.Tensor]) -> None:
    """Load a plan-independent state (``logical_tables`` / a gathered sharded ``state_dict``)
    into an unsharded ``FiitedEmbeddingBagCollection``; all-or-nothing, ``ValueError`` naming
    the table or pool. Its sketches and fallbacks stay as they are."""
    tables, errors = select_logical(module.store, state)
    if errors:
        raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
    import_tables(module.store, tables)
    if "steps_done" in state:
        module.steps_done.fill_(int(state["steps_done"]))


def gather_unsharded(sharded, dst: int = 0):
    """The whole collection as one unsharded ``FiitedEmbeddingBagCollection`` on rank ``dst``
    (None elsewhere; every rank must call this). Plan-independent: the tables' resident rows
    are gathered and loaded into fresh pools, e.g. for ``export_for_inference``; the unsharded
    pools must hold them (``ValueError`` naming the pool otherwise). Hashed fallbacks come along
    bucket by bucket (a column-split one stays fresh, logged); sketches are the plan's."""
    from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

    state = gather_state_dict(sharded.state_dict(), dst)
    every: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, held_pieces(sharded))
    if state is None:
        return None
    module = FiitedEmbeddingBagCollection(
        sharded._tables, sharded._config, is_weighted=sharded._is_weighted
    )
    load_logical_tables(module, state)
    pieces: Dict[str, list] = {}
    for per_rank in every:
        for table, held in per_rank.items():
            pieces.setdefault(table, []).extend(held)
    kept, restarted = assemble_fallbacks(module, pieces)
    for store, table, fallback in kept:
        load_fallback_state(store, table, fallback)
    if restarted:
        log.warning("hashed fallbacks of column-split tables are left fresh in the unsharded "
                    "collection: %s", sorted(set(restarted)))
    return module
