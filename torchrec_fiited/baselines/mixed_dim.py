"""Mixed-Dimension embeddings baseline (Ginart et al., "Mixed Dimension Embeddings with
Application to Memory-Efficient Recommendation Systems", ISIT 2021).

MD fixes, before training, one embedding dim ``d_t`` per table from the table's popularity
with the alpha-power rule ``d_t = lam * p_t ** temperature``, stores the table at ``d_t`` and
projects its pooled output back to the model's dim ``D_t`` with a learned ``d_t x D_t``
matrix. Unlike FIITED it prunes nothing during training, and its smallest footprint is fixed
by the smallest dim: it cannot reach very small budgets.

Terms: a "feature" of the MD paper is a table here (the app builds one table per sparse
feature); a table fed by several features gives all of them the same dim and projection.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

#: FBGEMM's TBE only takes dims that are multiples of 4 (``construct_split_state`` asserts
#: it), so dims are rounded to this step and never go below it.
DIM_STEP = 4
BYTES_PER_FLOAT = 4
# Candidate lams sit just past a rounding threshold so float error cannot round them down.
_THRESHOLD_NUDGE = 1.0 + 1e-9




class BudgetUnreachable(ValueError):
    """The budget is below what mixed-dimension embeddings can reach (dim 4 everywhere)."""

def feature_popularity(sparse_ids: np.ndarray) -> List[float]:
    """Mean access probability of the accessed row, per feature, from training ids.

    For feature f with N accesses and row counts c_r, ``p_f = sum_r (c_r / N) ** 2``: the
    average, over accesses, of the empirical access probability ``c_r / N`` of the row
    accessed. Uniform access over n rows gives ``1 / n``, the default of
    :class:`MixedDimEmbeddingBagCollection`; skew within a feature raises ``p_f``, so a
    feature whose traffic concentrates on few rows gets a larger dim, as in MD.

    Args:
        sparse_ids: int ``[N, F]``, one id per example and feature (``CTRArrays.sparse``).

    Returns:
        ``F`` floats in ``(0, 1]``.

    Raises:
        ValueError: if ``sparse_ids`` is not a non-empty 2-D array of non-negative ints.
    """
    ids = np.asarray(sparse_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"sparse_ids must be a non-empty int array [N, F], got dtype {ids.dtype} shape {ids.shape}"
        )
    if ids.min() < 0:
        raise ValueError(f"sparse_ids must be >= 0, got min {ids.min()}")
    n = ids.shape[0]
    probs = []
    for f in range(ids.shape[1]):
        counts = np.unique(ids[:, f], return_counts=True)[1].astype(np.float64)
        probs.append(float(np.sum((counts / n) ** 2)))
    return probs


def _table_bytes(num_embeddings: np.ndarray, dims: np.ndarray, full_dims: np.ndarray) -> np.ndarray:
    """Bytes of tables plus projections; a table kept at its full dim needs no projection.

    Args:
        num_embeddings: int ``[T]``.
        dims: int ``[..., T]`` chosen dims.
        full_dims: int ``[T]``.

    Returns:
        int ``[...]`` total bytes per dims row.
    """
    proj = np.where(dims < full_dims, dims * full_dims, 0)
    return ((num_embeddings * dims + proj) * BYTES_PER_FLOAT).sum(-1)


def _dims_at(lams: np.ndarray, scores: np.ndarray, full_dims: np.ndarray) -> np.ndarray:
    """``clip(round_to_step(lam * score), DIM_STEP, D)`` for every lam: int ``[C, T]``."""
    raw = lams[:, None] * scores[None, :]
    rounded = np.floor(raw / DIM_STEP + 0.5).astype(np.int64) * DIM_STEP
    return np.clip(rounded, DIM_STEP, full_dims[None, :])


def _check_inputs(n: np.ndarray, full: np.ndarray, p: np.ndarray, temperature: float, budget: float) -> None:
    if not (len(n) == len(full) == len(p)) or len(n) == 0:
        raise ValueError(
            f"need one popularity per table: {len(p)} popularities vs {len(n)} tables"
        )
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite fraction > 0 of the full bytes, got {budget}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"popularity must be finite and >= 0, got {p.tolist()}")
    if np.any(full % DIM_STEP != 0) or np.any(n < 1):
        raise ValueError(
            f"every embedding_dim must be a multiple of {DIM_STEP} (FBGEMM TBE) and every "
            f"num_embeddings >= 1, got dims {full.tolist()} and rows {n.tolist()}"
        )


def solve_dims(
    num_embeddings: Sequence[int],
    full_dims: Sequence[int],
    popularity: Sequence[float],
    temperature: float,
    budget: float,
) -> List[int]:
    """Per-table dims by MD's alpha-power rule, as large as ``budget`` allows.

    ``d_t = clip(round4(lam * p_t ** temperature), 4, D_t)``, where ``lam`` makes the bytes
    of tables plus projections, ``sum_t 4 * (n_t * d_t + d_t * D_t [d_t < D_t])``, the largest
    total that is ``<= budget * sum_t 4 * n_t * D_t``. The bytes are not monotone in lam
    (a table reaching ``D_t`` drops its projection), so instead of a bisection every lam at
    which some ``d_t`` steps is tried; there are ``sum_t D_t / 4`` of them.

    Args:
        num_embeddings: ``[T]`` rows per table.
        full_dims: ``[T]`` model dim ``D_t`` per table, multiples of 4.
        popularity: ``[T]`` mean row access probability ``p_t`` per table.
        temperature: alpha >= 0; 0 gives every table the same dim.
        budget: fraction of the full table bytes allowed.

    Returns:
        ``T`` dims, each a multiple of 4 in ``[4, D_t]``, non-decreasing in ``p_t``.

    Raises:
        ValueError: on bad inputs, or when even dim 4 everywhere exceeds the budget.
    """
    n = np.asarray(num_embeddings, dtype=np.int64)
    full = np.asarray(full_dims, dtype=np.int64)
    p = np.asarray(popularity, dtype=np.float64)
    _check_inputs(n, full, p, temperature, budget)
    full_bytes = int((n * full).sum()) * BYTES_PER_FLOAT
    cap = budget * full_bytes
    scores = p**temperature
    lams = [0.0]
    for s, d_full in zip(scores, full):
        if s > 0:  # a never-accessed table stays at the minimum dim for every lam
            steps = range(2 * DIM_STEP, d_full + 1, DIM_STEP)
            lams += [(d - DIM_STEP / 2) / s * _THRESHOLD_NUDGE for d in steps]
    dims = _dims_at(np.asarray(lams), scores, full)
    total = _table_bytes(n, dims, full)
    if total[0] > cap:
        raise BudgetUnreachable(
            f"budget={budget} is below what mixed-dimension embeddings can reach: MD by design "
            f"cannot reach it, since dim {DIM_STEP} for every table plus its projection takes "
            f"{int(total[0])} bytes = {total[0] / full_bytes:.4g} of the full {full_bytes} bytes; "
            f"use budget >= {total[0] / full_bytes:.4g} or a pruning method"
        )
    fits = np.where(total <= cap, total, -1)
    return [int(d) for d in dims[int(np.argmax(fits))]]


class MixedDimEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """Mixed-Dimension embeddings: reduced-dim tables projected back to the full dim.

    Same contract as TorchRec's ``EmbeddingBagCollection`` over the original ``tables``: for
    F features with dims D_f, a KJT with batch size B gives a ``KeyedTensor`` with the same
    keys, order and ``length_per_key``, values fp32 [B, sum_f D_f]. Table t is stored at
    dim ``d_t`` (:func:`solve_dims`) in a ``FusedEmbeddingBagCollection`` with fused
    row-wise Adagrad; its pooled output goes through ``nn.Linear(d_t, D_t, bias=False)``.
    Projecting after pooling equals pooling projected rows (the map is linear), at B rows
    of work instead of one per id. The projections are dense parameters: the dense
    optimizer trains them (``app.model.dense_parameters`` keeps them, drops the tables).

    Args:
        tables: original table configs; dims must be multiples of 4.
        budget: fraction of the full table bytes that tables plus projections may take.
        temperature: alpha of the power rule ``d_t ~ p_t ** alpha``.
        popularity: ``[T]`` mean row access probability per table (:func:`feature_popularity`);
            default ``1 / num_embeddings`` (uniform access, one id per example).
        lr: fused row-wise Adagrad learning rate.
        eps: fused row-wise Adagrad epsilon.
        device: where tables and projections live (default CPU).

    Raises:
        ValueError: see :func:`solve_dims`.

    Example::

        tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=100,
                                     feature_names=["f1"]),
                  EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=1000,
                                     feature_names=["f2"])]
        ebc = MixedDimEmbeddingBagCollection(tables, budget=0.5)
        ebc.dims()            # {"t1": 12, "t2": 4}
        #        0       1        2   <- batch
        # f1   [0,1]  None    [2]
        # f2   [3]    [4]     [5,6]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6]),
            lengths=torch.tensor([2, 0, 1, 1, 1, 2]))
        out = ebc(kjt)
        out.values().shape    # torch.Size([3, 32]); out.keys() == ["f1", "f2"]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        budget: float,
        temperature: float = 0.3,
        popularity: Optional[Sequence[float]] = None,
        lr: float = 0.01,
        eps: float = 1e-8,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        device = torch.device(device or "cpu")
        self._tables = list(tables)
        if popularity is None:
            popularity = [1.0 / t.num_embeddings for t in self._tables]
        dims = solve_dims([t.num_embeddings for t in self._tables],
                          [t.embedding_dim for t in self._tables], popularity, temperature, budget)
        self._dims = {t.name: d for t, d in zip(self._tables, dims)}
        # FusedEBC concatenates values group by group ((pooling, dtype)) but lists keys in
        # config order; ordering configs by group keeps its keys and values aligned.
        groups = list(dict.fromkeys((t.pooling, t.data_type) for t in self._tables))
        reduced = sorted((dataclasses.replace(t, embedding_dim=d) for t, d in zip(self._tables, dims)),
                         key=lambda t: groups.index((t.pooling, t.data_type)))
        self._ebc = FusedEmbeddingBagCollection(
            reduced, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": lr, "eps": eps},
            device=device,
        )
        self.projections = nn.ModuleDict({
            t.name: nn.Linear(d, t.embedding_dim, bias=False, device=device)
            for t, d in zip(self._tables, dims) if d < t.embedding_dim
        })
        self._features = [(f, t) for t in self._tables for f in t.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled reduced embeddings, projected to each table's full dim.

        Args:
            features: KJT over every feature of the tables, batch size B.

        Returns:
            KeyedTensor with values fp32 [B, sum_f D_f], keys in config order.
        """
        reduced = self._ebc(features).to_dict()  # feature -> fp32 [B, d_t]
        values = [self._project(t.name, reduced[f]) for f, t in self._features]
        return KeyedTensor(
            keys=[f for f, _ in self._features],
            length_per_key=[t.embedding_dim for _, t in self._features],
            values=torch.cat(values, dim=1),
        )

    def _project(self, table: str, pooled: torch.Tensor) -> torch.Tensor:
        return self.projections[table](pooled) if table in self.projections else pooled

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The original configs (full dims), so DLRM sizes its interaction for ``D``."""
        return self._tables

    def is_weighted(self) -> bool:
        return self._ebc.is_weighted()

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The inner ``FusedEmbeddingBagCollection``'s row-wise Adagrad over the tables."""
        return self._ebc.fused_optimizer()

    def dims(self) -> Dict[str, int]:
        """Chosen dim ``d_t`` per table name."""
        return dict(self._dims)

    def embedding_bytes(self) -> int:
        """Bytes of the reduced tables plus the projections (optimizer state excluded)."""
        tensors = list(self._ebc.parameters()) + list(self.projections.parameters())
        return sum(p.numel() * p.element_size() for p in tensors)
