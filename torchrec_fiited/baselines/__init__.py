"""Baselines FIITED is compared with (outside the FIITED layer stack; they import only TorchRec).

* :class:`MixedDimEmbeddingBagCollection`: Mixed-Dimension embeddings (Ginart et al.), one
  reduced dim per table chosen from popularity before training, projected back to ``D``.
"""

from torchrec_fiited.baselines.mixed_dim import (
    BudgetUnreachable,
    MixedDimEmbeddingBagCollection,
    feature_popularity,
    solve_dims,
)

__all__ = ["BudgetUnreachable", "MixedDimEmbeddingBagCollection", "feature_popularity", "solve_dims"]
