"""The hashing trick (Weinberger et al., ICML 2009): each table of ``E`` rows is stored as
``max(1, floor(budget * E))`` full-dim rows, and id ``i`` of it reads row
``mix64(i ^ salt_t) mod rows``. Colliding ids share a row for the whole of training.

The hash is SplitMix64's finalizer (Steele et al., OOPSLA 2014), a bijection on 64 bits with
full avalanche, written in torch int64 ops: multiplication wraps mod 2**64, and the right shifts
are made logical by masking off the sign-extended bits. The salt (from the table name) gives every
table its own hash, so two tables do not collide on the same id pairs.
"""

import hashlib
import math
from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.baselines.remapped import RemappedEmbeddingBagCollection, resized


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer, element-wise on int64 ``x`` (bit pattern in, bit pattern out)."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def table_salt(name: str) -> int:
    """A fixed 64-bit salt (as int64) from a table name, the same in every process."""
    return _signed(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


def hash_ids(ids: torch.Tensor, salt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row of each id: ``mix64(ids ^ salt) mod rows``, int64 in ``[0, rows)``.

    Args:
        ids: int ``[n]``.
        salt: int64 ``[n]`` or scalar, per id (its table's salt).
        rows: int64 ``[n]`` or scalar, > 0, per id (its table's hashed size).
    """
    return torch.remainder(mix64(ids.long() ^ salt), rows)


def hashed_rows(num_embeddings: int, budget: float) -> int:
    """``max(1, floor(budget * E))``, and ``E`` for ``budget >= 1``."""
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite fraction > 0 of the full rows, got {budget}")
    return num_embeddings if budget >= 1 else min(num_embeddings, max(1, math.floor(budget * num_embeddings)))


class HashedEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """The hashing trick over full-dim tables of ``max(1, floor(budget * E))`` rows.

    A table whose hashed size is its full size (``budget >= 1``) keeps the identity map, so
    budget 1 is exactly ``emb=full``. Bytes: ``rows * (D + 1) * 4`` per table (the weights and
    row-wise Adagrad's one float per row).

    Args:
        tables: original table configs.
        budget: fraction of each table's rows kept.
        lr: fused row-wise Adagrad learning rate.
        eps: fused row-wise Adagrad epsilon.
        device: where the tables live (default CPU).

    Example::

        tables = [EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=1000,
                                     feature_names=["f1"])]
        ebc = HashedEmbeddingBagCollection(tables, budget=0.1)
        ebc.hashed_rows()     # {"t1": 100}
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1"], values=torch.tensor([0, 999, 5]), lengths=torch.tensor([2, 1]))
        ebc(kjt).values().shape   # torch.Size([2, 16])
    """

    def __init__(self, tables: List[EmbeddingBagConfig], budget: float, lr: float = 0.01,
                 eps: float = 1e-8, device: Optional[torch.device] = None) -> None:
        rows = {t.name: hashed_rows(t.num_embeddings, budget) for t in tables}
        stored = [resized(t, t.name, rows[t.name], t.feature_names) for t in tables]
        super().__init__(tables, stored, lr, eps, device)
        self.set_constant("hashed", [rows[t.name] for _, t in self._features])
        self.set_constant("salt", [table_salt(t.name) for _, t in self._features])
        self._rows = rows

    def remap(self, features: KeyedJaggedTensor, position: torch.Tensor) -> KeyedJaggedTensor:
        values = features.values().long()
        rows = self.per_value("hashed", position)
        hashed = hash_ids(values, self.per_value("salt", position), rows)
        values = torch.where(rows == self.per_value("rows", position), values, hashed)
        return KeyedJaggedTensor(keys=features.keys(), values=values, lengths=features.lengths(),
                                 weights=features.weights_or_none())

    def hashed_rows(self) -> Dict[str, int]:
        """Stored rows per table name."""
        return dict(self._rows)
