"""Pure-PyTorch reference kernels for the chunked lookup and its fused backward.

This is the op layer a native kernel takes over: each function is one step of the hot path with
tensor-in, tensor-out semantics. Shapes use TorchRec's names: B bags, n ids, D = K * chunk_size.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def pooled_lookup(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    """Pool the chunks of each bag, pruned chunks reading as zeros.

    Args:
        weights: pool weights, fp32 [capacity, chunk_size].
        chunk_slots: slot of each id's chunks, int32 [n, K], -1 where pruned.
        offsets: bag boundaries, int64 [B + 1].
        per_sample_weights: fp32 [n] or None.
        mean: divide each bag by its length (empty bags give zeros).

    Returns:
        fp32 [B, K * chunk_size].
    """
    K = chunk_slots.shape[1]
    live = chunk_slots >= 0
    slots = chunk_slots.clamp(min=0).to(torch.int64)
    outs = []
    for k in range(K):
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


def occurrence_grads(
    grad_pooled: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    """Gradient reaching each id from its bag: fp32 [B, D] -> fp32 [n, D]."""
    lengths = offsets[1:] - offsets[:-1]
    bag_of_id = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths
    )
    scale = None
    if mean:
        scale = (1.0 / lengths.clamp(min=1).to(grad_pooled.dtype))[bag_of_id]
    if per_sample_weights is not None:
        scale = per_sample_weights if scale is None else scale * per_sample_weights
    grads = grad_pooled[bag_of_id]
    return grads if scale is None else grads * scale.unsqueeze(1)


def coalesce(
    entries: torch.Tensor, grads: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum the gradients of repeated entries.

    Args:
        entries: int64 [n].
        grads: fp32 [n, D].

    Returns:
        unique entries int64 [U] (sorted), accesses int64 [U], summed gradients fp32 [U, D].
    """
    unique, inverse = torch.unique(entries, return_inverse=True)
    summed = torch.zeros(unique.numel(), grads.shape[1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads)
    accesses = torch.bincount(inverse, minlength=unique.numel())
    return unique, accesses, summed


def sparse_update(
    optimizer: str,
    weights: torch.Tensor,
    momentum: torch.Tensor,
    slots: torch.Tensor,
    grads: torch.Tensor,
    lr: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Apply one optimizer step to distinct pool ``slots`` (int64 [n]) with ``grads`` [n, cs].

    Adagrad variants follow FBGEMM TBE's EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD, with the rowwise
    state kept per chunk slot (so K=1 is exactly TBE's rowwise Adagrad).
    """
    if slots.numel() == 0:
        return
    w = weights[slots]
    g = grads + weight_decay * w if weight_decay else grads
    if optimizer == "sgd":
        weights[slots] = w - lr * g
    elif optimizer == "adagrad":
        state = momentum[slots] + g * g
        momentum[slots] = state
        weights[slots] = w - lr * g / (state.sqrt() + eps)
    elif optimizer == "rowwise_adagrad":
        state = momentum[slots] + (g * g).mean(dim=1)
        momentum[slots] = state
        weights[slots] = w - (lr / (state.sqrt() + eps)).unsqueeze(1) * g
    else:
        raise ValueError(f"optimizer must be sgd, adagrad or rowwise_adagrad, got {optimizer!r}")
