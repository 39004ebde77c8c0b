"""Frequency oracle: a calibration tool, not a method one could deploy.

It keeps, from the start, the ``max(1, floor(budget * E))`` rows of each table that are most
frequent in the TRAINING data (counts known before training: an oracle), stores only those, and
drops every other id from the batch, so those ids pool to zeros and are never trained. It shows
what a pruning method that knew the final row popularity at step 0 would get at a given budget.

The id -> row map (int64 ``[E]`` per table) is derived from the counts at construction; it is a
plain tensor, not a buffer, so it is neither checkpointed (it is rebuilt from the same counts)
nor counted in the module's bytes: only the kept rows and their optimizer state are.
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.baselines.remapped import RemappedEmbeddingBagCollection, keep_values, resized


def feature_counts(sparse_ids: np.ndarray, feature_names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Training count of every id, per feature.

    Args:
        sparse_ids: int ``[N, F]``, one id per example and feature (``CTRArrays.sparse``).
        feature_names: the ``F`` feature names, in column order.

    Returns:
        feature name -> int64 ``[max id + 1]`` counts.

    Raises:
        ValueError: if the array is not 2-D with one column per name, or holds negative ids.
    """
    ids = np.asarray(sparse_ids)
    if ids.ndim != 2 or ids.shape[1] != len(feature_names) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"sparse_ids must be an int array [N, {len(feature_names)}], got dtype {ids.dtype} "
            f"shape {ids.shape}"
        )
    if ids.size and ids.min() < 0:
        raise ValueError(f"sparse_ids must be >= 0, got min {ids.min()}")
    return {f: np.bincount(ids[:, i]).astype(np.int64) for i, f in enumerate(feature_names)}


def top_rows(counts: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids with the highest counts, ties broken by the smaller id: int64 ``[k]``,
    most frequent first."""
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts, dtype=np.int64)))
    return order[:k].astype(np.int64)


def _table_counts(table: EmbeddingBagConfig, counts: Mapping[str, np.ndarray]) -> np.ndarray:
    total = np.zeros(table.num_embeddings, dtype=np.int64)
    for f in table.feature_names:
        if f not in counts:
            raise ValueError(f"no training counts for feature {f!r} (table {table.name!r})")
        c = np.asarray(counts[f], dtype=np.int64)
        if len(c) > table.num_embeddings and c[table.num_embeddings:].any():
            raise ValueError(
                f"feature {f!r}: training ids reach {int(np.flatnonzero(c).max())}, outside "
                f"[0, {table.num_embeddings}) of table {table.name!r}"
            )
        total[:min(len(c), table.num_embeddings)] += c[:table.num_embeddings]
    return total


def _kept_per_table(tables: List[EmbeddingBagConfig], totals: List[np.ndarray], budget: float,
                    scope: str) -> List[np.ndarray]:
    """Ids kept per table, most frequent first.

    ``table``: each table's ``max(1, floor(budget * E))`` most frequent ids. ``collection``: the
    ``floor(budget * sum E)`` most frequent (table, id) pairs of all tables together (every
    example has one id per feature, so counts compare across tables); a small table whose ids
    are all frequent stays whole, and every table keeps at least its most frequent id.
    """
    if scope == "table":
        return [top_rows(c, min(t.num_embeddings, max(1, math.floor(budget * t.num_embeddings))))
                for t, c in zip(tables, totals)]
    if scope != "collection":
        raise ValueError(f"scope must be 'collection' or 'table', got {scope!r}")
    counts = np.concatenate(totals)
    table_of = np.repeat(np.arange(len(totals)), [len(c) for c in totals])
    k = min(counts.size, max(len(totals), math.floor(budget * counts.size)))
    # Highest count first; ties by table order, then by id (the position within the table).
    order = np.lexsort((np.arange(counts.size), table_of, -counts))[:k]
    starts = np.cumsum([0] + [len(c) for c in totals[:-1]])
    kept = []
    for i, c in enumerate(totals):
        mine = order[table_of[order] == i] - starts[i]
        kept.append(mine if mine.size else top_rows(c, 1))
    return kept


class FreqOracleEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Keeps the most frequent training ids (of the collection, or of each table); drops the rest.

    A dropped id is removed from the KJT (its bag's length shrinks), so it contributes nothing:
    a bag of dropped ids only pools to zeros (SUM and MEAN alike), and no row is updated for it.
    Bytes: ``k * (D + 1) * 4`` per table.

    Args:
        tables: original table configs.
        budget: fraction of the rows kept (``>= 1`` keeps all).
        scope: ``collection`` (default) ranks all tables' ids together, ``table`` keeps
            ``max(1, floor(budget * E))`` ids of each table (see :func:`_kept_per_table`).
        counts: feature name -> training count per id (:func:`feature_counts`); a table fed by
            several features ranks ids by the sum of their counts.
        lr: fused row-wise Adagrad learning rate.
        eps: fused row-wise Adagrad epsilon.
        device: where the tables live (default CPU).

    Raises:
        ValueError: bad budget, missing counts, or counted ids outside a table.

    Example::

        tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=4,
                                     feature_names=["f1"])]
        ebc = FreqOracleEmbeddingBagCollection(tables, budget=0.5,
                                               counts={"f1": np.array([5, 0, 9, 1])})
        ebc.kept_ids()["t1"]    # tensor([2, 0]): rows 0 and 1 of the stored table
        #      0       1      <- batch
        # f1  [0, 1]  [3]     -> id 1 and id 3 are dropped; example 1 pools to zeros
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1"], values=torch.tensor([0, 1, 3]), lengths=torch.tensor([2, 1]))
        ebc(kjt).values().shape  # torch.Size([2, 16]); row 1 is all zeros
    """

    def __init__(self, tables: List[EmbeddingBagConfig], budget: float,
                 counts: Mapping[str, np.ndarray], lr: float = 0.01, eps: float = 1e-8,
                 device: Optional[torch.device] = None, scope: str = "collection") -> None:
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite fraction > 0 of the full rows, got {budget}")
        totals = [_table_counts(t, counts) for t in tables]
        kept = {t.name: ids.astype(np.int64) for t, ids in
                zip(tables, _kept_per_table(tables, totals, budget, scope))}
        stored = [resized(t, t.name, len(kept[t.name]), t.feature_names) for t in tables]
        super().__init__(tables, stored, lr, eps, device)
        self._kept = {name: torch.from_numpy(ids) for name, ids in kept.items()}
        maps, offsets, start = [], {}, 0
        for t in tables:
            m = torch.full((t.num_embeddings,), -1, dtype=torch.int64)
            m[self._kept[t.name]] = torch.arange(len(self._kept[t.name]))
            maps.append(m)
            offsets[t.name], start = start, start + t.num_embeddings
        self._id_map = torch.cat(maps)  # int64 [sum_t E_t]: stored row, or -1 if dropped
        self._maps_on: Dict[torch.device, torch.Tensor] = {}
        self.set_constant("map_offset", [offsets[t.name] for _, t in self._features])

    def remap(self, features: KeyedJaggedTensor, position: torch.Tensor) -> KeyedJaggedTensor:
        values = features.values().long()
        rows = self._map(values.device)[self.per_value("map_offset", position) + values]
        return keep_values(features, rows >= 0, rows)

    def _map(self, device: torch.device) -> torch.Tensor:
        if device not in self._maps_on:
            self._maps_on[device] = self._id_map.to(device)
        return self._maps_on[device]

    def kept_ids(self) -> Dict[str, torch.Tensor]:
        """Table name -> original ids kept, int64 ``[k]``; id ``kept[r]`` is stored row ``r``."""
        return {name: ids.clone() for name, ids in self._kept.items()}
