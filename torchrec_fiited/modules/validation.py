"""Input checks at the module boundary: every message names the feature or table.

They run before the store is touched, so a rejected batch leaves the state unchanged.
"""

from typing import List, Optional, Sequence

import torch
from torchrec.fx.tracer import is_fx_tracing as torchrec_is_fx_tracing
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_kjt(features: KeyedJaggedTensor, feature_names: Sequence[str], is_weighted: bool) -> int:
    """Validate the batch layout; returns the batch size B of the pooled output.

    As in TorchRec's ``EmbeddingBagCollection``, keys the module does not know are ignored (several
    collections may read one KJT), and a variable-batch (VBE) KJT is accepted when it carries
    ``inverse_indices`` for the module's features: B is then their width.

    Raises:
        ValueError: missing keys, a VBE KJT without inverse indices for the module's features, an
            empty batch, lengths that are negative or disagree with values/offsets, or weights of
            the wrong shape or kind.
    """
    if not isinstance(features, KeyedJaggedTensor):
        raise ValueError(f"expected a KeyedJaggedTensor, got {type(features).__name__}")
    keys = list(features.keys())
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(
            f"the KJT lacks the module's features: missing {missing} (KJT keys {keys}, module "
            f"features {list(feature_names)}; keys of other modules are ignored)"
        )
    strides = features.stride_per_key()
    B = vbe_batch_size(features, feature_names) if features.variable_stride_per_key() else features.stride()
    if B <= 0:
        raise ValueError(f"empty batch: the KJT has batch size {B}")
    lengths = features.lengths()
    values = features.values()
    if lengths.numel() != sum(strides):
        raise ValueError(
            f"lengths has {lengths.numel()} entries, expected one per bag: {sum(strides)} "
            f"({len(keys)} features, batch sizes {strides})"
        )
    if values.dim() != 1 or values.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"values must be a 1-D int32/int64 tensor, got {values.dtype} {tuple(values.shape)}")
    if not is_tracing():
        _check_lengths(features, keys, strides)
    _check_weights(features.weights_or_none(), values, is_weighted)
    return B


def vbe_batch_size(features: KeyedJaggedTensor, feature_names: Sequence[str]) -> int:
    """B of a VBE KJT's pooled output: the width of its ``inverse_indices`` [F', B].

    Raises:
        ValueError: no inverse indices, or none for one of ``feature_names``.
    """
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        raise ValueError(
            "a variable-batch (VBE) KJT needs inverse_indices: they map each of the B output rows "
            "to a bag of every feature (torchrec's EmbeddingBagCollection needs them too)"
        )
    inv_keys, inv = inverse
    lacking = [f for f in feature_names if f not in inv_keys]
    if lacking:
        raise ValueError(
            f"the VBE KJT's inverse_indices have no row for features {lacking} (they have {list(inv_keys)})"
        )
    if inv.dim() != 2 or inv.shape[0] != len(inv_keys):
        raise ValueError(
            f"inverse_indices must be [{len(inv_keys)} keys, B], got shape {tuple(inv.shape)}"
        )
    return int(inv.shape[1])


def is_tracing() -> bool:
    """True while torch.compile, torch.export or torch.fx capture a graph (or TorchScript compiles).

    Checks that need the data (a sync and a branch on it) run only in eager mode; the shape
    checks run everywhere. The ops themselves still check what they can with ``torch._check``.
    """
    return (
        torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torchrec_is_fx_tracing()
        or torch.fx._symbolic_trace._is_fx_tracing_flag
    )


def _check_lengths(features: KeyedJaggedTensor, keys: List[str], strides: List[int]) -> None:
    lengths = features.lengths()
    values = features.values()
    negative = lengths < 0
    if bool(negative.any()):
        owner = torch.repeat_interleave(torch.tensor(strides, dtype=torch.int64))
        bad = keys[int(owner[negative.nonzero()[0, 0].cpu()])]
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
