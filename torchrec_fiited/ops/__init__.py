"""Kernel layer: the pure-PyTorch reference ops (native kernels register under the same names)."""

from torchrec_fiited.ops.reference import coalesce, occurrence_grads, pooled_lookup, sparse_update

__all__ = ["coalesce", "occurrence_grads", "pooled_lookup", "sparse_update"]
