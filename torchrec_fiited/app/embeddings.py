"""Builds the embedding module for each ``emb=`` method, all sized by one ``budget`` knob.

Pruning cadence adapts to the data: the interval and warm-up are fractions of an epoch unless
given in steps, so the same preset works on a 200-step synthetic epoch and a 20k-step Criteo one.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.config import decay_for_budget
from torchrec_fiited.app.model import full_embeddings

FIITED_METHODS = ("fiited", "fiited_dynamic", "adaembed", "itep")
#: Baselines with no sharder: the app runs them as a single process only.
SINGLE_PROCESS_METHODS = ("mixed_dim", "hash", "qr", "freq_oracle")
METHODS = ("full",) + SINGLE_PROCESS_METHODS + FIITED_METHODS


@dataclass(frozen=True)
class EmbeddingSpec:
    """The ``emb`` config group.

    Args:
        method: one of ``METHODS``.
        fiited: FiitedConfig fields for the FIITED-family methods (budget, learning rate, seed
            and interval are filled in by the app).
        prune_interval: pruning period T in steps; None means ``prune_interval_fraction`` of an
            epoch.
        prune_interval_fraction: T as a fraction of the steps per epoch.
        warmup_fraction: no cycle before this fraction of the first epoch.
        temperature: Mixed-Dimension power-law temperature.
        oracle_scope: ``freq_oracle``: rank ids over the whole ``collection`` or per ``table``.
        dim_cold_start_fraction: FIITED-2D (``fiited.dim_pruning``): full width for this fraction
            of the first epoch, unless ``fiited.dim_pruning.cold_start_steps`` is given.
    """

    method: str = "fiited"
    fiited: Optional[Dict[str, Any]] = None
    prune_interval: Optional[int] = None
    prune_interval_fraction: float = 0.05
    warmup_fraction: float = 0.0
    temperature: float = 0.3
    dim_cold_start_fraction: float = 0.2
    oracle_scope: str = "collection"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"emb.method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0.0 < self.prune_interval_fraction <= 10.0:
            raise ValueError(
                f"emb.prune_interval_fraction must be in (0, 10], got {self.prune_interval_fraction}"
            )


def fiited_config(spec: EmbeddingSpec, budget: float, lr: float, eps: float, steps_per_epoch: int,
                  seed: int) -> FiitedConfig:
    """FiitedConfig for a FIITED-family method, with the cadence derived from the epoch."""
    interval = spec.prune_interval or max(1, round(spec.prune_interval_fraction * steps_per_epoch))
    fields = dict(spec.fiited or {})
    fields.setdefault("warmup_steps", int(spec.warmup_fraction * steps_per_epoch))
    if fields.get("decay") is None:  # null in the method's config: from the budget
        fields["decay"] = decay_for_budget(budget)
    dims = fields.get("dim_pruning")
    if isinstance(dims, dict) and "cold_start_steps" not in dims:
        cold = max(1, round(spec.dim_cold_start_fraction * steps_per_epoch))
        fields["dim_pruning"] = {**dims, "cold_start_steps": cold}
    return FiitedConfig(**{**fields, "budget": budget, "learning_rate": lr, "eps": eps,
                           "prune_interval": interval, "seed": seed})


def build_embeddings(
    spec: EmbeddingSpec,
    tables: List[EmbeddingBagConfig],
    budget: float,
    lr: float,
    eps: float,
    steps_per_epoch: int,
    seed: int,
    popularity: Optional[Sequence[float]] = None,
    counts: Optional[Mapping[str, np.ndarray]] = None,
) -> EmbeddingBagCollectionInterface:
    """The embedding module of ``spec.method`` over ``tables`` at ``budget``.

    ``popularity`` (Mixed-Dimension) and ``counts`` (frequency oracle: feature name -> training
    count per id) come from the training data; other methods ignore them.
    """
    if spec.method == "full":
        return full_embeddings(tables, lr, eps)
    if spec.method == "hash":
        from torchrec_fiited.baselines import HashedEmbeddingBagCollection

        return HashedEmbeddingBagCollection(tables, budget=budget, lr=lr, eps=eps)
    if spec.method == "qr":
        from torchrec_fiited.baselines import QREmbeddingBagCollection

        return QREmbeddingBagCollection(tables, budget=budget, lr=lr, eps=eps)
    if spec.method == "freq_oracle":
        from torchrec_fiited.baselines import FreqOracleEmbeddingBagCollection

        if counts is None:
            raise ValueError("emb=freq_oracle needs the training counts per id (counts=...)")
        return FreqOracleEmbeddingBagCollection(tables, budget=budget, counts=counts, lr=lr, eps=eps,
                                                scope=spec.oracle_scope)
    if spec.method == "mixed_dim":
        from torchrec_fiited.baselines.mixed_dim import MixedDimEmbeddingBagCollection

        return MixedDimEmbeddingBagCollection(
            tables, budget=budget, temperature=spec.temperature, popularity=popularity, lr=lr, eps=eps
        )
    return FiitedEmbeddingBagCollection(
        tables, fiited_config(spec, budget, lr, eps, steps_per_epoch, seed)
    )


def fused_optimizer(module: torch.nn.Module) -> Optional[KeyedOptimizer]:
    """The optimizer a module applies in backward, or None."""
    optimizer = getattr(module, "fused_optimizer", None)
    # torchrec 1.8's FusedEmbeddingBagCollection defines fused_optimizer as a method.
    return optimizer() if callable(optimizer) else optimizer


def embedding_bytes(module: torch.nn.Module) -> int:
    """Bytes the embedding module's tensors hold now (parameters, buffers and fused state), each
    tensor counted once (FBGEMM's tables and their state are views of shared storages)."""
    if isinstance(module, FiitedEmbeddingBagCollection):
        return module.stats()["bytes"]["total"]
    tensors = list(module.parameters()) + list(module.buffers())
    optimizer = fused_optimizer(module)
    if optimizer is not None:
        for per_param in optimizer.state.values():
            tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    return _distinct_bytes(tensors)


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors, a view seen twice (same storage, offset and size) counted once."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def local_shard_bytes(module: torch.nn.Module) -> int:
    """Bytes of this rank's shards of a sharded embedding module; summed over the ranks it is
    the module's total.

    A module with ``stats()`` (sharded FIITED) reports its own bytes, because its state dict is
    the logical ``[E, D]`` layout rather than the pools it holds. Otherwise: its state dict and
    its fused optimizer's state, each storage counted once (the state dict holds views of the
    kernels' weights).
    """
    if callable(getattr(module, "stats", None)):
        return _stats_bytes(module.stats())
    optimizer = fused_optimizer(module)
    values = list(module.state_dict().values())
    if optimizer is not None:
        values += [v for per_param in optimizer.state_dict()["state"].values()
                   for v in per_param.values()]
    return _distinct_bytes(
        t for value in values
        for t in ([s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor)
                  else [value] if isinstance(value, torch.Tensor) else [])
    )


def _stats_bytes(stats: Dict[str, Any]) -> int:
    if "bytes" in stats:
        return int(stats["bytes"]["total"])
    # ShardedFiitedEmbeddingBagCollection.stats(): {sharding_type: FiitedEBC.stats()}.
    return sum(int(per_type["bytes"]["total"]) for per_type in stats.values())
