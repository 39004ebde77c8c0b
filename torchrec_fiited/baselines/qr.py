"""Quotient-remainder compositional embeddings (Shi et al., "Compositional Embeddings Using
Complementary Partitions for Memory-Efficient Recommendation Systems", KDD 2020).

A table of ``E`` rows is stored as a quotient table of ``ceil(E / m)`` rows and a remainder table
of ``m`` rows, both at the full dim; id ``i`` reads ``q[i // m] * r[i % m]`` (element-wise
product, the paper's best operation). As in the paper's ``QREmbeddingBag`` (facebookresearch/dlrm),
each table is pooled first and the pooled rows are multiplied, which is the per-id product for
one-id bags (the app's CTR data); every id still gets a distinct pair of rows.

The rows ``ceil(E / m) + m`` can never go below ``ceil(2 sqrt(E))``, so a small budget of a big
table is out of reach (:class:`BudgetUnreachable`), and a table of a few rows is kept whole.

Init: the quotient table as the full table would be (``+-sqrt(1 / E)``), the remainder table at
ones, so at step 0 the product is the quotient row, at the full table's scale. (The dlrm code
draws both from ``U(sqrt(1 / E), 1)``; a product of two such rows starts far larger than
``emb=full``.)
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.baselines.mixed_dim import BudgetUnreachable
from torchrec_fiited.baselines.remapped import RemappedEmbeddingBagCollection, resized

QUOTIENT, REMAINDER = "__q", "__r"
# Integers this far around each root of m + E/m = target are tried (ceil makes the rows a step
# function of m; the best m is within a couple of the real roots).
_WINDOW = 3
_BISECTION_STEPS = 60


def qr_rows(num_embeddings: int, m: int) -> int:
    """Rows of the two tables: ``ceil(E / m) + m``."""
    return -(-num_embeddings // m) + m


def _candidates(E: int, target: float) -> np.ndarray:
    """Remainder sizes worth trying for ``target`` rows: near the roots and near sqrt(E)."""
    centers = [math.sqrt(E)]
    disc = target * target - 4.0 * E
    if disc >= 0:
        centers += [(target - math.sqrt(disc)) / 2, (target + math.sqrt(disc)) / 2]
    ms = {int(c) + d for c in centers for d in range(-_WINDOW, _WINDOW + 1)}
    return np.array(sorted(m for m in ms if 2 <= m <= E - 1), dtype=np.int64)


def remainder_size(num_embeddings: int, target: float) -> Optional[int]:
    """The ``m`` whose rows ``ceil(E / m) + m`` come closest to ``target`` from below, or None
    if none fits.

    ``m`` and ``ceil(E / m)`` play mirrored roles (the paper's "collisions" is the small one of
    the two); the closer fit wins, and the smaller ``m`` on ties.
    """
    ms = _candidates(num_embeddings, target)
    if len(ms) == 0:
        return None
    rows = -(-num_embeddings // ms) + ms
    fits = rows <= target
    if not fits.any():
        return None
    best = rows[fits].max()
    return int(ms[fits & (rows == best)].min())


def min_qr_rows(num_embeddings: int) -> int:
    """Fewest rows QR can store a table in (``ceil(2 sqrt(E))``); ``E`` if QR cannot help."""
    ms = _candidates(num_embeddings, 0.0)
    return min([num_embeddings] + [qr_rows(num_embeddings, int(m)) for m in ms])


def solve_remainders(num_embeddings: Sequence[int], dims: Sequence[int], budget: float) -> List[Optional[int]]:
    """A remainder size per table (None: kept whole) fitting ``budget`` of the full table bytes.

    Every table aims at ``s * E_t`` rows for one scale ``s``. A table that QR cannot shrink
    (``ceil(2 sqrt(E)) >= E``) is kept whole, and one whose aim is below its QR minimum stays at
    that minimum; the largest ``s`` whose total ``sum_t D_t * rows_t`` fits
    ``budget * sum_t D_t * E_t`` is found by bisection (rows grow with ``s``). With every table
    reachable this is ``budget * E_t`` per table, to rounding.

    Args:
        num_embeddings: ``[T]`` rows per table.
        dims: ``[T]`` embedding dims.
        budget: fraction of the full table bytes allowed; ``>= 1`` keeps every table whole.

    Raises:
        ValueError: a budget that is not a positive number.
        BudgetUnreachable: even every table at its QR minimum exceeds the budget.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite fraction > 0 of the full bytes, got {budget}")
    n = [int(e) for e in num_embeddings]
    if budget >= 1:
        return [None] * len(n)
    floor_rows = [min_qr_rows(e) for e in n]
    shrinkable = [f < e for f, e in zip(floor_rows, n)]
    full_bytes = sum(e * d for e, d in zip(n, dims))
    cap = budget * full_bytes

    def choose(scale: float) -> List[Optional[int]]:
        return [remainder_size(e, max(scale * e, f)) if s else None
                for e, f, s in zip(n, floor_rows, shrinkable)]

    def total(ms: List[Optional[int]]) -> int:
        return sum(d * (e if m is None else qr_rows(e, m)) for e, d, m in zip(n, dims, ms))

    lowest = choose(0.0)
    if total(lowest) > cap:
        reachable = total(lowest) / full_bytes
        raise BudgetUnreachable(
            f"budget={budget} is below what QR embeddings can reach: QR by design cannot reach "
            f"it, since each table needs at least ceil(2 sqrt(E)) rows (tables of a few rows stay "
            f"whole), {reachable:.4g} of the full bytes here; use budget >= {reachable:.4g}"
        )
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(choose(mid)) <= cap else (lo, mid)
    return choose(lo)


class QREmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Quotient-remainder embeddings: per table, ``q[i // m] * r[i % m]`` at the full dim.

    Both tables of every feature live in one ``FusedEmbeddingBagCollection`` (fused row-wise
    Adagrad), fed by two derived features ``<f>__q`` (ids ``i // m``) and ``<f>__r`` (``i % m``);
    the output has the original keys and dims. Bytes: ``(ceil(E / m) + m) * (D + 1) * 4`` per
    table (weights and row-wise Adagrad's float per row).

    Args:
        tables: original table configs.
        budget: fraction of the full table bytes (:func:`solve_remainders`).
        lr: fused row-wise Adagrad learning rate.
        eps: fused row-wise Adagrad epsilon.
        device: where the tables live (default CPU).

    Raises:
        BudgetUnreachable: the budget is below QR's minimum (see :func:`solve_remainders`).

    Example::

        tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=1000,
                                     feature_names=["f1"])]
        ebc = QREmbeddingBagCollection(tables, budget=0.1)
        ebc.remainders()   # {"t1": 88}: 12 quotient + 88 remainder rows = 100 = 0.1 x 1000
        #                    (m = 12 would give 84 + 12 = 96 rows, further from the budget)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1"], values=torch.tensor([0, 999, 5]), lengths=torch.tensor([2, 1]))
        ebc(kjt).values().shape   # torch.Size([2, 16])
    """

    def __init__(self, tables: List[EmbeddingBagConfig], budget: float, lr: float = 0.01,
                 eps: float = 1e-8, device: Optional[torch.device] = None) -> None:
        ms = solve_remainders([t.num_embeddings for t in tables],
                              [t.embedding_dim for t in tables], budget)
        self._m = {t.name: m for t, m in zip(tables, ms)}
        stored = []
        for t, m in zip(tables, ms):
            if m is None:
                stored.append(resized(t, t.name, t.num_embeddings, t.feature_names))
                continue
            stored.append(resized(t, t.name + QUOTIENT, qr_rows(t.num_embeddings, m) - m,
                                  [f + QUOTIENT for f in t.feature_names]))
            stored.append(dataclasses.replace(
                resized(t, t.name + REMAINDER, m, [f + REMAINDER for f in t.feature_names]),
                init_fn=torch.nn.init.ones_))
        super().__init__(tables, stored, lr, eps, device)
        self.set_constant("m", [self._m[t.name] or 0 for _, t in self._features])

    def remap(self, features: KeyedJaggedTensor, position: torch.Tensor) -> KeyedJaggedTensor:
        keys, values = features.keys(), features.values().long()
        m = self.per_value("m", position)
        is_qr = m > 0
        m = torch.where(is_qr, m, torch.ones_like(m))
        split = [i for i, k in enumerate(keys) if self._m[self._table_of(k)] is not None]
        lengths = features.lengths().view(len(keys), -1)
        weights = features.weights_or_none()
        return KeyedJaggedTensor(
            keys=[k + QUOTIENT if i in split else k for i, k in enumerate(keys)]
            + [keys[i] + REMAINDER for i in split],
            values=torch.cat([values // m, (values % m)[is_qr]]),
            lengths=torch.cat([lengths.reshape(-1), lengths[split].reshape(-1)]),
            weights=torch.cat([weights, weights[is_qr]]) if weights is not None else None,
        )

    def pooled(self, stored: Dict[str, torch.Tensor], feature: str) -> torch.Tensor:
        if self._m[self._table_of(feature)] is None:
            return stored[feature]
        return stored[feature + QUOTIENT] * stored[feature + REMAINDER]

    def _table_of(self, feature: str) -> str:
        return self._features[self._position[feature]][1].name

    def remainders(self) -> Dict[str, Optional[int]]:
        """Remainder size ``m`` per table name (None: stored whole)."""
        return dict(self._m)
