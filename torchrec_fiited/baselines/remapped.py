"""Shared base of the baselines that re-index ids into smaller tables before a plain lookup.

Hashing (:mod:`.hashing`), quotient-remainder (:mod:`.qr`) and the frequency oracle
(:mod:`.freq_oracle`) differ only in how an id of an original table maps to rows of the tables
actually stored; the lookup, the fused row-wise Adagrad, the id checks and the EBC contract live
here once. Every transform is vectorized over the KJT's values: per value, the index of its
feature is recovered from the lengths, and per-feature constants (salt, sizes, offsets) are
gathered with it, so no Python runs per id.

Terms: ``F`` features, ``B`` batch size, ``n`` ids in the batch (``values`` is int ``[n]``,
``lengths`` int ``[F * B]``, feature-major as in every KJT), ``E`` rows of an original table.
"""

import dataclasses
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def resized(table: EmbeddingBagConfig, name: str, num_embeddings: int,
            feature_names: Sequence[str]) -> EmbeddingBagConfig:
    """``table`` stored as ``num_embeddings`` rows under ``name``, initialized like the original.

    The init keeps the original table's bounds ``+-sqrt(1 / E)`` (torchrec's default), so a
    smaller table starts at the scale the full one would.
    """
    bound = math.sqrt(1.0 / table.num_embeddings)
    lo = table.weight_init_min if table.weight_init_min is not None else -bound
    hi = table.weight_init_max if table.weight_init_max is not None else bound
    return dataclasses.replace(
        table, name=name, num_embeddings=int(num_embeddings), feature_names=list(feature_names),
        init_fn=functools.partial(torch.nn.init.uniform_, a=lo, b=hi),
    )


@torch.fx.wrap
def value_feature_index(features: KeyedJaggedTensor) -> torch.Tensor:
    """Index (into ``features.keys()``) of the feature each value belongs to: int64 ``[n]``.

    Uses the per-key totals of ``lengths`` with a known output size, so it does not sync.
    """
    keys = features.keys()
    B = features.stride()
    values = features.values()
    per_key = features.lengths().view(len(keys), B).sum(1)
    return torch.repeat_interleave(
        torch.arange(len(keys), device=values.device), per_key, output_size=values.numel()
    )


@torch.fx.wrap
def bag_index(features: KeyedJaggedTensor) -> torch.Tensor:
    """Index of the bag (``f * B + b``) each value belongs to: int64 ``[n]``."""
    lengths = features.lengths()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths,
        output_size=features.values().numel(),
    )


def keep_values(features: KeyedJaggedTensor, keep: torch.Tensor,
                values: torch.Tensor) -> KeyedJaggedTensor:
    """The KJT with only the ``values[keep]`` ids (same keys and batch), lengths recounted.

    Args:
        features: the original KJT.
        keep: bool ``[n]``, which ids stay.
        values: int64 ``[n]``, the (remapped) ids to put in place of the original ones.
    """
    dropped = torch.bincount(bag_index(features)[~keep], minlength=features.lengths().numel())
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=features.keys(), values=values[keep],
        lengths=features.lengths() - dropped.to(features.lengths().dtype),
        weights=weights[keep] if weights is not None else None,
    )


class RemappedEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """Original logical tables served from resized tables via a per-feature id transform.

    Same contract as TorchRec's ``EmbeddingBagCollection`` over the original ``tables``: a KJT
    over their features with batch size B gives a ``KeyedTensor`` with the same keys (config
    order) and ``length_per_key``, values fp32 ``[B, sum_f D_f]``. The stored tables live in one
    ``FusedEmbeddingBagCollection`` with fused row-wise Adagrad (the optimizer of
    ``emb=full``), which is all the module's state. Subclasses give the stored configs and
    :meth:`remap` (original KJT -> KJT over the stored features); :meth:`pooled` combines the
    stored features' pooled rows into one original feature's (default: same name).

    Args:
        tables: the original table configs (what :meth:`embedding_bag_configs` reports).
        stored: configs of the tables actually stored (their ``feature_names`` are the keys
            :meth:`remap` produces).
        lr: fused row-wise Adagrad learning rate.
        eps: fused row-wise Adagrad epsilon.
        device: where the stored tables live (default CPU).

    Raises:
        ValueError: in ``forward``, an id outside ``[0, E)`` of its table (names the feature).
    """

    def __init__(self, tables: List[EmbeddingBagConfig], stored: List[EmbeddingBagConfig],
                 lr: float, eps: float, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self._tables = list(tables)
        self._features: List[Tuple[str, EmbeddingBagConfig]] = [
            (f, t) for t in self._tables for f in t.feature_names
        ]
        self._position = {f: i for i, (f, _) in enumerate(self._features)}
        # FusedEBC concatenates values group by group ((pooling, dtype)) but lists keys in
        # config order; ordering configs by group keeps its keys and values aligned.
        groups = list(dict.fromkeys((t.pooling, t.data_type) for t in stored))
        self._stored = sorted(stored, key=lambda t: groups.index((t.pooling, t.data_type)))
        self._ebc = FusedEmbeddingBagCollection(
            self._stored, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": lr, "eps": eps},
            device=torch.device(device or "cpu"),
        )
        self._constants: Dict[str, List[int]] = {"rows": [t.num_embeddings for _, t in self._features]}
        self._on_device: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    # ---- per-feature constants -----------------------------------------------------------

    def set_constant(self, name: str, per_feature: Sequence[int]) -> None:
        """Declare an int64 constant per original feature (config order)."""
        if len(per_feature) != len(self._features):
            raise ValueError(f"{name}: {len(per_feature)} values vs {len(self._features)} features")
        self._constants[name] = [int(v) for v in per_feature]

    def constant(self, name: str, device: torch.device) -> torch.Tensor:
        """Constant ``name`` as int64 ``[F_config]`` on ``device`` (cached; not a buffer, so it is
        neither in the state dict nor in the module's bytes: it is derived from the configs)."""
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = torch.tensor(self._constants[name], dtype=torch.int64, device=device)
        return self._on_device[key]

    def per_value(self, name: str, position: torch.Tensor) -> torch.Tensor:
        """Constant ``name`` of each value's feature: int64 ``[n]`` (``position`` from
        :meth:`value_positions`)."""
        return self.constant(name, position.device)[position]

    def value_positions(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Config-order position of each value's feature: int64 ``[n]``."""
        keys = features.keys()
        unknown = [k for k in keys if k not in self._position]
        if unknown:
            raise ValueError(
                f"KJT keys {unknown} are not features of this module (expected {list(self._position)})"
            )
        key_pos = torch.tensor([self._position[k] for k in keys], dtype=torch.int64,
                               device=features.values().device)
        return key_pos[value_feature_index(features)]

    # ---- forward -------------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Checked ids -> :meth:`remap` -> stored lookup -> :meth:`pooled` per original feature.

        Args:
            features: KJT over every feature of the original tables, batch size B.

        Returns:
            KeyedTensor with values fp32 ``[B, sum_f D_f]``, keys in config order.
        """
        position = self.value_positions(features)
        self._check_ids(features, position)
        stored = self._ebc(self.remap(features, position)).to_dict()
        return KeyedTensor(
            keys=[f for f, _ in self._features],
            length_per_key=[t.embedding_dim for _, t in self._features],
            values=torch.cat([self.pooled(stored, f) for f, _ in self._features], dim=1),
        )

    def _check_ids(self, features: KeyedJaggedTensor, position: torch.Tensor) -> None:
        values = features.values()
        bad = (values < 0) | (values >= self.per_value("rows", position))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            f, t = self._features[int(position[i])]
            raise ValueError(
                f"feature {f!r} (table {t.name!r}): id {int(values[i])} outside "
                f"[0, {t.num_embeddings}); ids must index the table's rows"
            )

    def remap(self, features: KeyedJaggedTensor, position: torch.Tensor) -> KeyedJaggedTensor:
        """The KJT over the stored features.

        Args:
            features: the checked original KJT.
            position: int64 ``[n]``, config-order feature of each value.
        """
        raise NotImplementedError

    def pooled(self, stored: Dict[str, torch.Tensor], feature: str) -> torch.Tensor:
        """Original ``feature``'s pooled rows fp32 ``[B, D]`` from the stored features' ones."""
        return stored[feature]

    # ---- EBC and fused-optimizer contract ----------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The original configs, so DLRM sees the logical tables and their dims."""
        return self._tables

    def stored_configs(self) -> List[EmbeddingBagConfig]:
        """Configs of the tables actually stored."""
        return list(self._stored)

    def is_weighted(self) -> bool:
        return self._ebc.is_weighted()

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The stored ``FusedEmbeddingBagCollection``'s row-wise Adagrad."""
        return self._ebc.fused_optimizer()

    def stored_weights(self) -> Dict[str, torch.Tensor]:
        """Stored table name -> its weight fp32 ``[rows, D]`` (the live parameter)."""
        return {name: bag.weight for name, bag in self._ebc.embedding_bags.items()}
