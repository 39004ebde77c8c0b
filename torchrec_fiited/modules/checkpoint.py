"""Checkpoint state of a FiitedEmbeddingBagCollection and its strict validation on load.

Loading is all-or-nothing for the module: the pre-hook checks keys, shapes, dtypes, the
configuration and the store's invariants of the incoming state before any tensor is copied.
"""

from typing import Any, Dict, List

import torch

EXTRA = "_extra_state"


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
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match this FiitedEmbeddingBagCollection: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    _check_extra(own[EXTRA], incoming[EXTRA])
    for key, mine in own.items():
        if key == EXTRA:
            continue
        theirs = incoming[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = (tuple(theirs.shape), theirs.dtype) if isinstance(theirs, torch.Tensor) else type(theirs)
            raise ValueError(
                f"checkpoint key {prefix + key!r}: expected {tuple(mine.shape)} {mine.dtype}, got {got}"
            )
    store_state = {k[len("store."):]: v for k, v in incoming.items() if k.startswith("store.")}
    errors = module.store.invariant_errors(store_state)
    if int(incoming["steps_done"]) < 0:
        errors.append(f"steps_done={int(incoming['steps_done'])} is negative")
    if errors:
        raise ValueError("corrupt FIITED checkpoint: " + "; ".join(errors))


def _check_extra(mine: Dict[str, Any], theirs: Any) -> None:
    if not isinstance(theirs, dict) or not {"config", "tables", "last_cycle"} <= set(theirs):
        raise ValueError("corrupt FIITED checkpoint: _extra_state lacks config/tables/last_cycle")
    if theirs["tables"] != mine["tables"]:
        raise ValueError(
            f"checkpoint tables differ from this module's: {theirs['tables']} vs {mine['tables']}"
        )
    diffs = [
        f"{k}: {theirs['config'].get(k)!r} vs {v!r}"
        for k, v in mine["config"].items()
        if theirs["config"].get(k) != v
    ]
    if diffs:
        raise ValueError(
            "checkpoint is from another FiitedConfig (checkpoint vs module): " + ", ".join(diffs)
        )
