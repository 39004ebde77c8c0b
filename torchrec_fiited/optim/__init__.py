"""Fused sparse optimizer exposure (the update kernels live in ``ops``)."""

from torchrec_fiited.optim.fused import FiitedFusedOptimizer, InBackwardOptimizer

__all__ = ["FiitedFusedOptimizer", "InBackwardOptimizer"]
