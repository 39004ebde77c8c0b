"""Plan-independent views of a FIITED collection's state: whole logical tables in one process."""

from typing import Dict, Optional

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_fiited.store.logical import export_table


def logical_tables(module) -> Dict[str, torch.Tensor]:
    """An unsharded ``FiitedEmbeddingBagCollection``'s logical state, keyed like a sharded
    collection's ``state_dict`` (``embedding_bags.<t>.weight``, ``...fiited_live``, ...)."""
    from torchrec_fiited.distributed.logical_state import _FIELD_KEYS

    out = {}
    for name in module.store.layouts:
        for field, tensor in export_table(module.store, name).items():
            out[f"embedding_bags.{name}.{_FIELD_KEYS[field]}"] = tensor
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
