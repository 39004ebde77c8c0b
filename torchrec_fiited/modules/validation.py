"""Input checks at the module boundary: every message names the feature or table.

They run before the store is touched, so a rejected batch leaves the state unchanged.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_kjt(features: KeyedJaggedTensor, feature_names: Sequence[str], is_weighted: bool) -> int:
    """Validate the batch layout; returns the batch size B.

    Raises:
        ValueError: unknown or missing keys, variable batch sizes, an empty batch, lengths that
            are negative or disagree with values/offsets, or weights of the wrong shape or kind.
    """
    if not isinstance(features, KeyedJaggedTensor):
        raise ValueError(f"expected a KeyedJaggedTensor, got {type(features).__name__}")
    keys = list(features.keys())
    unknown = [k for k in keys if k not in feature_names]
    missing = [f for f in feature_names if f not in keys]
    if unknown or missing:
        raise ValueError(
            f"KJT keys must be exactly the module's features: unknown {unknown}, missing {missing} "
            f"(expected {list(feature_names)})"
        )
    if features.variable_stride_per_key():
        raise ValueError("variable batch size per feature (VBE) KJTs are not supported")
    B = features.stride()
    if B <= 0:
        raise ValueError(f"empty batch: the KJT has batch size {B}")
    lengths = features.lengths()
    values = features.values()
    if lengths.numel() != len(keys) * B:
        raise ValueError(
            f"lengths has {lengths.numel()} entries, expected {len(keys)} features x {B} = {len(keys) * B}"
        )
    if values.dim() != 1 or values.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"values must be a 1-D int32/int64 tensor, got {values.dtype} {tuple(values.shape)}")
    per_key = lengths.view(len(keys), B)
    if bool((per_key < 0).any()):
        bad = keys[int((per_key < 0).any(1).nonzero()[0])]
        raise ValueError(f"feature {bad!r}: negative lengths")
    if int(lengths.sum()) != values.numel():
        raise ValueError(
            f"lengths sum to {int(lengths.sum())} but values has {values.numel()} ids"
        )
    offsets = features.offsets()
    if offsets.numel() != lengths.numel() + 1 or not torch.equal(
        offsets[1:] - offsets[:-1], lengths.to(offsets.dtype)
    ):
        raise ValueError("offsets are inconsistent with lengths")
    _check_weights(features.weights_or_none(), values, is_weighted)
    return B


def _check_weights(weights: Optional[torch.Tensor], values: torch.Tensor, is_weighted: bool) -> None:
    if not is_weighted:
        return
    if weights is None:
        raise ValueError("the module is weighted (is_weighted=True) but the KJT has no weights")
    if weights.shape != values.shape or not weights.is_floating_point():
        raise ValueError(
            f"weights must be a float tensor shaped like values {tuple(values.shape)}, "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )


def check_ids(feature: str, table: str, ids: torch.Tensor, num_entries: int) -> None:
    """Without ``hash_ids``, ids must lie in [0, num_embeddings)."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_entries:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"feature {feature!r} (table {table!r}): id {bad} outside [0, {num_entries}); "
            f"set hash_ids=True to hash arbitrary ids into the table"
        )


def check_table_names(names: List[str]) -> None:
    """Table names become module keys, so they must be unique and free of dots."""
    seen = set()
    for name in names:
        if not name or "." in name:
            raise ValueError(f"table name {name!r} must be non-empty and contain no '.'")
        if name in seen:
            raise ValueError(f"duplicate table name {name!r}")
        seen.add(name)
