"""Planning FIITED tables by the memory they really hold.

TorchRec's planner charges a table its dense ``rows x dim`` bytes (``ModuleSharder.storage_usage``
is not consulted in 1.8), so ``FiitedStorageEstimator`` rewrites the storage of FIITED shards
after the stock estimate, and ``make_fiited_planner`` wires it into an ``EmbeddingShardingPlanner``.
"""

import dataclasses
from typing import Dict, List, Optional

from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
)
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption, Storage

from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

_FP32 = 4


def fiited_shard_bytes(rows: int, cols: int, dim: int, num_chunks: int, budget: float, optimizer: str) -> int:
    """Bytes a FIITED shard of ``rows x cols`` (of a table with ``dim`` columns) holds.

    Pools budget x rows x cols fp32; per slot a 4 B free-stack entry and the optimizer state
    (4 B rowwise, chunk_size x 4 B adagrad); per row 8K + 5 B of VHPI metadata, where K counts
    the shard's chunks.
    """
    chunk_size = dim // num_chunks
    k_local = cols // chunk_size
    slots = int(budget * rows * k_local)
    per_slot = {"sgd": 0, "rowwise_adagrad": _FP32, "adagrad": chunk_size * _FP32}[optimizer]
    return slots * (chunk_size * _FP32 + _FP32 + per_slot) + rows * (8 * k_local + 5)


class FiitedStorageEstimator(EmbeddingStorageEstimator):
    """The stock storage estimate, with each FIITED shard's dense tensor bytes replaced by
    ``fiited_shard_bytes`` (IO buffers are kept as estimated)."""

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:
        super().estimate(sharding_options, sharder_data_map)
        for so in sharding_options:
            module = so.module[1]
            if not isinstance(module, FiitedEmbeddingBagCollection):
                continue
            cfg = module.config
            dim = so.tensor.shape[1]
            for shard in so.shards:
                rows, cols = shard.size
                dense = rows * cols * so.tensor.element_size()
                fiited = fiited_shard_bytes(
                    rows, cols, dim, cfg.num_chunks, cfg.budget_for(so.name), cfg.optimizer
                )
                s = shard.storage
                if s is None:
                    continue
                if s.hbm >= dense:
                    shard.storage = dataclasses.replace(s, hbm=s.hbm - dense + fiited)
                elif s.ddr >= dense:
                    shard.storage = dataclasses.replace(s, ddr=s.ddr - dense + fiited)


def make_fiited_planner(
    world_size: int,
    compute_device: str = "cpu",
    batch_size: int = 512,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    topology: Optional[Topology] = None,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` whose storage model knows FIITED's budgets.

    Args:
        world_size: ranks to plan for.
        compute_device: "cpu" or "cuda".
        batch_size: per-rank batch size (drives the IO and perf estimates).
        constraints: per-table ``ParameterConstraints`` (e.g. to force a sharding type).
        topology: a full ``Topology`` (memory sizes, bandwidths) instead of the defaults.
    """
    topology = topology or Topology(world_size=world_size, compute_device=compute_device)
    enumerator = EmbeddingEnumerator(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        estimator=[
            EmbeddingPerfEstimator(topology=topology, constraints=constraints),
            FiitedStorageEstimator(topology=topology, constraints=constraints),
        ],
    )
    return EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator, constraints=constraints
    )
