"""Baselines FIITED is compared with (outside the FIITED layer stack; they import only TorchRec).

* :class:`MixedDimEmbeddingBagCollection`: Mixed-Dimension embeddings (Ginart et al.), one
  reduced dim per table chosen from popularity before training, projected back to ``D``.
* :class:`HashedEmbeddingBagCollection`: the hashing trick, ``budget * E`` full-dim rows per table.
* :class:`QREmbeddingBagCollection`: quotient-remainder compositional embeddings (Shi et al.),
  ``q[i // m] * r[i % m]`` with ``m`` solved from the budget.
* :class:`FreqOracleEmbeddingBagCollection`: a calibration tool, not a method: keeps the
  ``budget * E`` most frequent training ids of each table and drops the others.

The re-indexing ones share :class:`RemappedEmbeddingBagCollection` (one FusedEBC of resized
tables behind a vectorized per-feature id transform).
"""

from torchrec_fiited.baselines.freq_oracle import (
    FreqOracleEmbeddingBagCollection,
    feature_counts,
    top_rows,
)
from torchrec_fiited.baselines.hashing import HashedEmbeddingBagCollection, hash_ids, mix64
from torchrec_fiited.baselines.mixed_dim import (
    BudgetUnreachable,
    MixedDimEmbeddingBagCollection,
    feature_popularity,
    solve_dims,
)
from torchrec_fiited.baselines.qr import QREmbeddingBagCollection, solve_remainders
from torchrec_fiited.baselines.remapped import RemappedEmbeddingBagCollection

__all__ = [
    "BudgetUnreachable", "FreqOracleEmbeddingBagCollection", "HashedEmbeddingBagCollection",
    "MixedDimEmbeddingBagCollection", "QREmbeddingBagCollection", "RemappedEmbeddingBagCollection",
    "feature_counts", "feature_popularity", "hash_ids", "mix64", "solve_dims", "solve_remainders",
    "top_rows",
]
