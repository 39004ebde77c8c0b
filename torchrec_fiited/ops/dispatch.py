"""Picks the implementation of each FIITED op: native when built, else the reference.

The native ops (``torch.ops.fiited.*``, see ``ops/native.py``) run when the library is loaded and
has a kernel for the tensors' device; ``TORCHREC_FIITED_NATIVE=0`` in the environment forces the
reference (read at every call, so tests and benchmarks can switch it). Both take and return the
same tensors; see ``ops/reference.py`` for the contracts.
"""

import os
from typing import Optional, Sequence, Tuple

import torch

from torchrec_fiited.ops import hash_reference, native, reference
from torchrec_fiited.ops.reference import FusedParams

NATIVE_ENV = "TORCHREC_FIITED_NATIVE"


def _serves(devices, device: torch.device) -> bool:
    """Whether a native op family with kernels for ``devices`` serves tensors on ``device``."""
    return native.AVAILABLE and device.type in devices and os.environ.get(NATIVE_ENV, "1") != "0"


def use_native(device: torch.device) -> bool:
    """Whether the native ops serve tensors on ``device``."""
    return _serves(native.DEVICES, device)


def lookup_forward(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    """Pooled chunks fp32 [B, K * chunk_size]; see ``reference.lookup_forward`` for the args."""
    if use_native(weights.device):
        return torch.ops.fiited.lookup_forward(
            weights, chunk_slots, entries, offsets, per_sample_weights, mean
        )
    return reference.lookup_forward(
        weights, chunk_slots, entries, offsets, per_sample_weights, mean
    )


def lookup_forward_out(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
    out: torch.Tensor,
) -> None:
    """``lookup_forward`` written into ``out`` fp32 [B, K * chunk_size] (unit column stride).

    ``out`` may be a column block of a collection's [B, sum D] output: the native op then writes
    there directly, with no per-feature output and no concatenation.
    """
    if use_native(weights.device):
        torch.ops.fiited.lookup_forward_out(
            weights, chunk_slots, entries, offsets, per_sample_weights, mean, out
        )
        return
    pooled = reference.lookup_forward(
        weights, chunk_slots, entries, offsets, per_sample_weights, mean
    )
    out.copy_(pooled)


def lookup_forward_batched(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_cols: torch.Tensor,
    feature_mean: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """F features of one pool pooled into their column blocks of ``out`` fp32 [B, W], one call;
    see ``reference.lookup_forward_batched`` for the args."""
    if use_native(weights.device):
        torch.ops.fiited.lookup_forward_batched_out(
            weights, chunk_slots, entries, offsets, per_sample_weights, feature_cols,
            feature_mean, out,
        )
        return
    reference.lookup_forward_batched(
        weights, chunk_slots, entries, offsets, per_sample_weights, feature_cols, feature_mean, out
    )


def fused_backward(
    grad_rows: torch.Tensor,
    row_of_id: torch.Tensor,
    id_scale: Optional[torch.Tensor],
    entries: torch.Tensor,
    chunk_slots: torch.Tensor,
    utilities: torch.Tensor,
    weights: torch.Tensor,
    momentum: torch.Tensor,
    params: FusedParams,
    utility_scale: float = 1.0,
    miss_utilities: Optional[torch.Tensor] = None,
) -> None:
    """In-place utility and optimizer update; see ``reference.fused_backward`` for the args."""
    if use_native(weights.device):
        torch.ops.fiited.fused_backward(
            grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, weights, momentum,
            params.optimizer, params.lr, params.eps, params.weight_decay, params.utility,
            utility_scale, miss_utilities,
        )
        return
    reference.fused_backward(
        grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, weights, momentum,
        params, utility_scale, miss_utilities,
    )


# ---- resident-id hash table (store/hash_table.py; contracts in ops/hash_reference.py) ----------


def use_native_hash(device: torch.device) -> bool:
    """Whether the native hash-table ops serve tensors on ``device``."""
    return _serves(native.HASH_DEVICES, device)


def hash_lookup(table_keys: torch.Tensor, bucket_size: int, keys: torch.Tensor,
                missing: int = -1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Slots int64 [n] (``missing`` where not resident); see ``hash_reference.lookup``. With
    ``out`` (int64 [n], contiguous), written there and returned."""
    if use_native_hash(table_keys.device):
        if out is None:
            return torch.ops.fiited.hash_lookup(table_keys, bucket_size, keys, missing)
        torch.ops.fiited.hash_lookup_out(table_keys, bucket_size, keys, missing, out)
        return out
    slots = hash_reference.lookup(table_keys, bucket_size, keys, missing)
    return slots if out is None else out.copy_(slots)


def hash_insert(
    table_keys: torch.Tensor,
    table_scores: torch.Tensor,
    bucket_size: int,
    keys: torch.Tensor,
    scores: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slots, evicted_keys, evicted_slots); see ``hash_reference.insert``."""
    if use_native_hash(table_keys.device):
        return torch.ops.fiited.hash_insert(table_keys, table_scores, bucket_size, keys, scores)
    return hash_reference.insert(table_keys, table_scores, bucket_size, keys, scores)


def hash_erase(
    table_keys: torch.Tensor, table_scores: torch.Tensor, bucket_size: int, keys: torch.Tensor
) -> int:
    """Number of keys erased; see ``hash_reference.erase``."""
    if use_native_hash(table_keys.device):
        return int(torch.ops.fiited.hash_erase(table_keys, table_scores, bucket_size, keys))
    return hash_reference.erase(table_keys, table_scores, bucket_size, keys)


# ---- utility sketch (store/sketch.py holds the reference) ----------------------------------------


def use_native_sketch(device: torch.device) -> bool:
    """Whether the native sketch ops serve tensors on ``device``."""
    return _serves(native.SKETCH_DEVICES, device)


def counter_uniform_grid(
    prefix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tail: Sequence[int]
) -> torch.Tensor:
    """Counter-based uniforms fp32 [n, w], bitwise ``reference.counter_uniform_grid``; the
    native op folds each value in registers (chunk re-initialisation, ``VHPIStore.allocate``)."""
    if _serves(native.INIT_DEVICES, rows.device):
        return torch.ops.fiited.counter_uniform_grid(prefix, rows, cols, list(tail))
    return reference.counter_uniform_grid(prefix, rows, cols, tail)


def feature_keys(
    ids: torch.Tensor,
    id_starts: Sequence[int],
    key_base: torch.Tensor,
    row_offset: torch.Tensor,
    num_entries: torch.Tensor,
    hash_ids: bool,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, int]:
    """(keys int64 [n], first out-of-range position or -1) of F features' ids back to back, in
    one native pass; see ``reference.feature_keys`` for the contract. With ``out`` (int64 [n],
    contiguous), the keys are written there."""
    if _serves(native.KEYS_DEVICES, ids.device):
        starts = torch.tensor(list(id_starts), dtype=torch.int64)
        if out is None:
            keys, bad = torch.ops.fiited.feature_keys(ids, starts, key_base, row_offset,
                                                      num_entries, hash_ids)
            return keys, int(bad)
        bad = torch.ops.fiited.feature_keys_out(ids, starts, key_base, row_offset, num_entries,
                                                hash_ids, out)
        return out, int(bad)
    keys, bad = reference.feature_keys(ids, id_starts, key_base, row_offset, num_entries, hash_ids)
    return (keys if out is None else out.copy_(keys)), bad


def expand_bags(values: torch.Tensor, offsets: torch.Tensor, num_ids: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [num_ids]: ``values`` int64 [nb] repeated over the ids of each bag (``offsets``
    int64 [nb + 1]), i.e. ``torch.repeat_interleave(values, offsets.diff())``, in one pass; with
    ``out`` (int64 [num_ids], contiguous), written there and returned."""
    if _serves(native.KEYS_DEVICES, values.device):
        if out is None:
            return torch.ops.fiited.expand_bags(values, offsets, num_ids)
        torch.ops.fiited.expand_bags_out(values, offsets, out)
        return out
    expanded = torch.repeat_interleave(values, offsets.diff(), output_size=num_ids)
    return expanded if out is None else out.copy_(expanded)


def positions_equal(values: torch.Tensor, value: int) -> torch.Tensor:
    """Positions int64 [m], ascending, where ``values`` int64 [n] equals ``value``: one pass, no
    n-sized mask."""
    if _serves(native.KEYS_DEVICES, values.device):
        return torch.ops.fiited.positions_equal(values, value)
    return (values == value).nonzero().squeeze(1)


def positions_in(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions int64 [m], ascending, where ``mask`` bool [M] is set at ``values`` int64 [n]
    (each in [0, M)): ``mask[values].nonzero()`` in one pass."""
    if _serves(native.KEYS_DEVICES, values.device):
        return torch.ops.fiited.positions_in(values, mask)
    return mask[values].nonzero().squeeze(1)


def row_permutation(
    rows: torch.Tensor, id_starts: Sequence[int], num_rows: Sequence[int], shift: Sequence[int],
    inverse: bool,
) -> torch.Tensor:
    """Row-wise shards' hash-range routing of F features' rows back to back, in one native pass;
    see ``reference.row_permutation`` (bitwise ``store.layout.row_permutation``)."""
    if _serves(native.KEYS_DEVICES, rows.device) and len(num_rows):
        def long(values):
            return torch.tensor(list(values), dtype=torch.int64)

        return torch.ops.fiited.row_permutation(
            rows.to(torch.int64), long(id_starts), long(num_rows), long(shift), inverse
        )
    return reference.row_permutation(rows, id_starts, num_rows, shift, inverse)
