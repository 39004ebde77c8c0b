"""Pure-PyTorch reference of the FIITED ops: the chunked lookup and the fused backward.

These two functions are the contract a native kernel takes over (``ops/dispatch.py`` picks the
implementation). Shapes use TorchRec's names: B bags, n ids, E entries, D = K * chunk_size,
C pool capacity. Terms (entry, chunk_slots, slot, ...) are defined in ``store/layout.py``.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
UTILITIES = ("grad_access", "access")


@dataclass(frozen=True)
class FusedParams:
    """Hyper-parameters of the fused backward.

    Args:
        optimizer: "sgd", "adagrad" or "rowwise_adagrad" (rowwise per chunk slot).
        lr: learning rate.
        eps: Adagrad epsilon.
        weight_decay: L2 penalty added to live chunks' gradients.
        utility: "grad_access" (u += a * ||g||) or "access" (u += a).
        decay: gamma.
        step: the training step in progress (utilities are brought to it before adding).
    """

    optimizer: str
    lr: float
    eps: float
    weight_decay: float
    utility: str
    decay: float
    step: int


def lookup_forward(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    """Pool the chunks of each bag; pruned chunks read as zeros.

    Args:
        weights: pool weights, fp32 [C, chunk_size].
        chunk_slots: the table's slots, int16 or int32 [E, K], -1 where pruned.
        entries: int64 [n], each in [0, E).
        offsets: bag boundaries, int64 [B + 1].
        per_sample_weights: fp32 [n] or None.
        mean: divide each bag by its length (an empty bag gives zeros).

    Returns:
        fp32 [B, K * chunk_size].
    """
    slots = chunk_slots[entries]
    live = slots >= 0
    slots = slots.clamp(min=0).to(torch.int64)
    outs = []
    for k in range(slots.shape[1]):
        # Zero weight for a pruned chunk: embedding_bag then adds nothing for it.
        w = live[:, k].to(weights.dtype)
        if per_sample_weights is not None:
            w = w * per_sample_weights
        outs.append(
            F.embedding_bag(
                slots[:, k], weights, offsets, mode="sum", per_sample_weights=w,
                include_last_offset=True,
            )
        )
    pooled = torch.cat(outs, dim=1)
    if mean:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(pooled.dtype)
        pooled = pooled / lengths.unsqueeze(1)
    return pooled


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
    """``lookup_forward`` of F features of one pool in one call, written into ``out``.

    Args:
        weights, chunk_slots, entries, per_sample_weights: as ``lookup_forward``.
        offsets: int64 [F * B + 1]; bag ``f * B + b`` is row b of feature f.
        feature_cols: int64 [F], the first column of feature f's D = K * chunk_size block.
        feature_mean: bool [F], divide feature f's bags by their length.
        out: fp32 [B, W] (the collection's KeyedTensor values), written in place at the blocks.
    """
    F = feature_cols.numel()
    B = (offsets.numel() - 1) // F
    D = chunk_slots.shape[1] * weights.shape[1]
    for f, (col, mean) in enumerate(zip(feature_cols.tolist(), feature_mean.tolist())):
        bounds = offsets[f * B : (f + 1) * B + 1]
        start, end = int(bounds[0]), int(bounds[-1])
        psw = None if per_sample_weights is None else per_sample_weights[start:end]
        out[:, col : col + D] = lookup_forward(
            weights, chunk_slots, entries[start:end], bounds - start, psw, bool(mean)
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
    """Coalesce one table's id gradients, update utilities and apply the optimizer, in place.

    The gradient of id i is ``id_scale[i] * grad_rows[row_of_id[i]]`` (the scale folds in
    per-sample weights and 1/length for MEAN pooling). Repeated entries are summed; a = their
    count. Every chunk of a touched entry gets u += a * ||g_chunk|| * utility_scale (pruned chunks
    too: their gradient is the one at the zero-padded slice); only live chunks are updated.
    Utilities are stored against a base step (``store.EntryTable``): the true utility at step t
    is u * gamma^(t - base), so an addition at step t is scaled by gamma^(base - t).

    Args:
        grad_rows: fp32 [R, D], the pooled-output gradients of the table's bags.
        row_of_id: int64 [n], the bag row of each id.
        id_scale: fp32 [n] or None (all ones).
        entries: int64 [n], each in [0, E + G) or -1: the id is skipped (an id of another
            entry table). E + g is miss group g (``miss_utilities``).
        chunk_slots: int16 or int32 [E, K] (read).
        utilities: fp32 [E, K] (updated for touched entries).
        weights: fp32 [C, chunk_size] (updated at live slots).
        momentum: fp32 [C, chunk_size] (adagrad), [C] (rowwise_adagrad) or [0] (sgd).
        params: hyper-parameters.
        utility_scale: gamma^(base - step), fp32-finite and > 0.
        miss_utilities: fp32 [G, K] or None (G = 0). Group g gathers the ids of one key without
            an entry: it earns into row g exactly what an entry with every chunk pruned would,
            unscaled (as of now), and nothing else is updated for it. One call (one sort) then
            serves a table's hits and misses.
    """
    E = chunk_slots.shape[0]
    if miss_utilities is not None:
        miss = entries >= E
        if bool(miss.any()):
            grads = grad_rows[row_of_id[miss]]
            if id_scale is not None:
                grads = grads * id_scale[miss].unsqueeze(1)
            groups, _, gains = coalesced_gains(
                entries[miss] - E, grads, chunk_slots.shape[1], params.utility)
            miss_utilities[groups] = miss_utilities[groups] + gains
            entries = torch.where(miss, -1, entries)
    skip = entries < 0
    if bool(skip.any()):
        keep = ~skip
        row_of_id, entries = row_of_id[keep], entries[keep]
        id_scale = None if id_scale is None else id_scale[keep]
    if entries.numel() == 0:
        return
    grads = grad_rows[row_of_id]
    if id_scale is not None:
        grads = grads * id_scale.unsqueeze(1)
    unique, summed, gains = coalesced_gains(entries, grads, chunk_slots.shape[1], params.utility)
    K = chunk_slots.shape[1]
    g_chunks = summed.view(unique.numel(), K, grad_rows.shape[1] // K)  # [U, K, chunk_size]

    utilities[unique] = utilities[unique] + gains * utility_scale

    slots = chunk_slots[unique].to(torch.int64)
    live = slots >= 0
    sparse_update(weights, momentum, slots[live], g_chunks[live], params)


def coalesced_gains(ids: torch.Tensor, grads: torch.Tensor, num_chunks: int, utility: str):
    """Sum the gradients fp32 [n, D] of repeated ``ids`` (int64 [n]) and score each chunk.

    Returns the distinct ids int64 [U] (ascending), their summed gradients fp32 [U, D] and the
    utility each chunk earns fp32 [U, K]: a * ||g_chunk|| ("grad_access") or a ("access"), a the
    id's count. The rule of ``fused_backward``, which ``policy.missed_gains`` also runs for the
    ids without an entry.
    """
    unique, inverse = torch.unique(ids, return_inverse=True)
    summed = torch.zeros(unique.numel(), grads.shape[1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads)
    accesses = torch.bincount(inverse, minlength=unique.numel()).to(grads.dtype)
    if utility == "grad_access":
        gains = accesses.unsqueeze(1) * summed.view(unique.numel(), num_chunks, -1).norm(dim=2)
    else:
        gains = accesses.unsqueeze(1).expand(-1, num_chunks) * 1.0
    return unique, summed, gains


def sparse_update(
    weights: torch.Tensor,
    momentum: torch.Tensor,
    slots: torch.Tensor,
    grads: torch.Tensor,
    params: FusedParams,
) -> None:
    """One optimizer step at distinct pool ``slots`` (int64 [n]) with ``grads`` fp32 [n, cs].

    Adagrad variants follow FBGEMM TBE's EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD, with the rowwise
    state kept per chunk slot (so K=1 is exactly TBE's rowwise Adagrad).
    """
    if slots.numel() == 0:
        return
    w = weights[slots]
    g = grads + params.weight_decay * w if params.weight_decay else grads
    if params.optimizer == "sgd":
        weights[slots] = w - params.lr * g
    elif params.optimizer == "adagrad":
        state = momentum[slots] + g * g
        momentum[slots] = state
        weights[slots] = w - params.lr * g / (state.sqrt() + params.eps)
    elif params.optimizer == "rowwise_adagrad":
        state = momentum[slots] + (g * g).mean(dim=1)
        momentum[slots] = state
        weights[slots] = w - (params.lr / (state.sqrt() + params.eps)).unsqueeze(1) * g
    else:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {params.optimizer!r}")


def counter_uniform_grid(
    prefix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tail: Sequence[int]
) -> torch.Tensor:
    """``store.layout.counter_uniform_from(prefix[:, None], [rows[:, None], cols, *tail])``:
    uniforms fp32 [n, w] for prefix and rows int64 [n], cols int64 [n, w]."""
    # Imported here: store imports the ops (dispatch), so a module-level import would cycle.
    from torchrec_fiited.store.layout import counter_uniform_from

    return counter_uniform_from(prefix.unsqueeze(1), [rows.unsqueeze(1), cols, *tail])


def feature_keys(
    ids: torch.Tensor,
    id_starts: Sequence[int],
    key_base: torch.Tensor,
    row_offset: torch.Tensor,
    num_entries: torch.Tensor,
    hash_ids: bool,
) -> Tuple[torch.Tensor, int]:
    """Keys int64 [n] of F features' ids back to back (feature f: ``ids[id_starts[f]:id_starts[f
    + 1]]``): row = the id (or ``store.layout.hash_ids`` of it), key = ``entry_key`` with
    feature f's ``key_base`` (table_index << 56) after adding its ``row_offset``. Also the
    position of the first id outside [0, num_entries[f]) without ``hash_ids`` (-1 when none;
    the keys are then unspecified): the caller raises, naming the feature."""
    from torchrec_fiited.store.layout import _ROW_MASK, hash_ids as hashed

    device = ids.device
    n, F = id_starts[-1], len(id_starts) - 1
    counts = torch.tensor([id_starts[f + 1] - id_starts[f] for f in range(F)], device=device)
    feature_of_id = torch.repeat_interleave(torch.arange(F, device=device), counts, output_size=n)
    ids = ids.to(torch.int64)
    entries = num_entries[feature_of_id]
    first_bad = -1
    if hash_ids:
        rows = hashed(ids, entries)
    else:
        bad = (ids < 0) | (ids >= entries)
        if n and bool(bad.any()):
            first_bad = int(bad.nonzero()[0])
        rows = ids
    rows = rows + row_offset[feature_of_id]
    return (rows & _ROW_MASK) | key_base[feature_of_id], first_bad


def row_permutation(
    rows: torch.Tensor, id_starts: Sequence[int], num_rows: Sequence[int], shift: Sequence[int],
    inverse: bool,
) -> torch.Tensor:
    """``store.layout.row_permutation`` of F features' rows back to back (feature f:
    ``rows[id_starts[f]:id_starts[f + 1]] + shift[f]`` in [0, num_rows[f])), int64 [n].

    Raises:
        ValueError: a row outside [0, num_rows[f]) after the shift.
    """
    from torchrec_fiited.store.layout import row_permutation as permute

    parts = []
    for f in range(len(num_rows)):
        x = rows[id_starts[f] : id_starts[f + 1]].to(torch.int64) + shift[f]
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_rows[f]):
            raise ValueError(f"row_permutation: feature {f} has rows outside [0, {num_rows[f]})")
        parts.append(permute(x, num_rows[f], inverse))
    return torch.cat(parts) if parts else rows.to(torch.int64)
