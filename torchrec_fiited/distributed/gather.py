"""Plan-independent views of a FIITED collection's state: whole logical tables in one process."""

from typing import Dict, Optional

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_fiited.store.logical import export_table, import_tables, logical_shapes, state_key


def logical_tables(module) -> Dict[str, torch.Tensor]:
    """An unsharded ``FiitedEmbeddingBagCollection``'s logical state, keyed like a sharded
    collection's ``state_dict`` (``embedding_bags.<t>.weight``, ``...fiited_live``, ...)."""
    out = {}
    for name in module.store.layouts:
        for field, tensor in export_table(module.store, name).items():
            out[state_key(name, field)] = tensor
    out["steps_done"] = module.steps_done.clone()
    return out


def gather_state_dict(state_dict, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Whole tensors of a sharded ``state_dict`` on rank ``dst`` (every rank must call this);
    other ranks get None. Plain tensors are taken as they are."""
    rank = torch.distributed.get_rank()
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full
        elif rank == dst:
            out[key] = value
    return out if rank == dst else None


def load_logical_tables(module, state: Dict[str, torch.Tensor]) -> None:
    """Load a logical state (``logical_tables`` / a gathered sharded ``state_dict``) into an
    unsharded ``FiitedEmbeddingBagCollection``; all-or-nothing, ``ValueError`` naming the table."""
    tables = {}
    for name in module.store.layouts:
        fields = {}
        for field in logical_shapes(module.store, name):
            key = state_key(name, field)
            if key not in state:
                raise ValueError(f"table {name!r}: the state lacks {key!r}")
            fields[field] = state[key]
        tables[name] = fields
    import_tables(module.store, tables)
    if "steps_done" in state:
        module.steps_done.fill_(int(state["steps_done"]))


def gather_unsharded(sharded, dst: int = 0):
    """The whole collection as one unsharded ``FiitedEmbeddingBagCollection`` on rank ``dst``
    (None elsewhere; every rank must call this). Plan-independent: the logical tables are
    gathered and loaded into fresh pools, e.g. for ``export_for_inference``."""
    from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

    state = gather_state_dict(sharded.state_dict(), dst)
    if state is None:
        return None
    module = FiitedEmbeddingBagCollection(
        sharded._tables, sharded._config, is_weighted=sharded._is_weighted
    )
    load_logical_tables(module, state)
    return module
