"""Kernel layer: the FIITED ops (reference in PyTorch; native kernels take over when built)."""

from torchrec_fiited.ops.dispatch import (
    fused_backward, lookup_forward, lookup_forward_batched, lookup_forward_out,
)
from torchrec_fiited.ops.reference import FusedParams

__all__ = ["FusedParams", "fused_backward", "lookup_forward", "lookup_forward_batched",
           "lookup_forward_out"]
