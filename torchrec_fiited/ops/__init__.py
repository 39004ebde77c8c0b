"""Kernel layer: the FIITED ops (reference in PyTorch; native kernels take over when built)."""

from torchrec_fiited.ops.dispatch import (
    fused_backward, lookup_forward, lookup_forward_batched, lookup_forward_out,
)
from torchrec_fiited.ops.reference import FusedParams, decayed_utilities

__all__ = ["FusedParams", "decayed_utilities", "fused_backward", "lookup_forward", "lookup_forward_batched",
           "lookup_forward_out"]
