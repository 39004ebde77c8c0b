"""Picks the implementation of each FIITED op: native when built, else the reference."""

from torchrec_fiited.ops import reference

lookup_forward = reference.lookup_forward
fused_backward = reference.fused_backward
