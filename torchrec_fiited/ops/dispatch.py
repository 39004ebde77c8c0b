"""Picks the implementation of each FIITED op: native when built, else the reference.

The native ops (``torch.ops.fiited.*``, see ``ops/native.py``) run when the library is loaded and
has a kernel for the tensors' device; ``TORCHREC_FIITED_NATIVE=0`` in the environment forces the
reference (read at every call, so tests and benchmarks can switch it). Both take and return the
same tensors; see ``ops/reference.py`` for the contracts.
"""

import os
from typing import Optional

import torch

from torchrec_fiited.ops import native, reference
from torchrec_fiited.ops.reference import FusedParams

NATIVE_ENV = "TORCHREC_FIITED_NATIVE"


def use_native(device: torch.device) -> bool:
    """Whether the native ops serve tensors on ``device``."""
    return (
        native.AVAILABLE
        and device.type in native.DEVICES
        and os.environ.get(NATIVE_ENV, "1") != "0"
    )


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


def fused_backward(
    grad_rows: torch.Tensor,
    row_of_id: torch.Tensor,
    id_scale: Optional[torch.Tensor],
    entries: torch.Tensor,
    chunk_slots: torch.Tensor,
    utilities: torch.Tensor,
    last_step: torch.Tensor,
    weights: torch.Tensor,
    momentum: torch.Tensor,
    params: FusedParams,
) -> None:
    """In-place utility and optimizer update; see ``reference.fused_backward`` for the args."""
    if use_native(weights.device):
        torch.ops.fiited.fused_backward(
            grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, last_step, weights,
            momentum, params.optimizer, params.lr, params.eps, params.weight_decay,
            params.utility, params.decay, params.step,
        )
        return
    reference.fused_backward(
        grad_rows, row_of_id, id_scale, entries, chunk_slots, utilities, last_step, weights,
        momentum, params,
    )
