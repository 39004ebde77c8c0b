"""Planning FIITED tables by the memory they really hold.

TorchRec's planner charges a table its dense ``rows x dim`` bytes (``ModuleSharder.storage_usage``
is not consulted in 1.8), so ``FiitedStorageEstimator`` rewrites the storage of FIITED shards
after the stock estimate, and ``make_fiited_planner`` wires it into an ``EmbeddingShardingPlanner``.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import (
    EmbeddingPerfEstimator,
    EmbeddingStorageEstimator,
)
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited.config import FiitedConfig
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.modules.layout_plan import (
    LogicalPools,
    logical_pools,
    pool_slots,
    shard_pool_fraction,
)
from torchrec_fiited.store import ChunkPool, EntryTable


def _buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def fiited_shard_bytes(
    tables: List[EmbeddingBagConfig],
    config: FiitedConfig,
    table: str,
    size: Sequence[int],
    offset: Sequence[int],
    logical: Optional[LogicalPools] = None,
) -> int:
    """Bytes a FIITED shard holds: rows ``size[0]`` and columns ``size[1]`` of ``table`` (one of
    the collection's ``tables``), starting at ``offset`` = (row, column).

    The pool slots come from ``layout_plan.shard_pool_fraction``, the rule the sharded module
    sizes its pools by, so a column shard is charged the water-filled share of its chunk range;
    the bytes are those of the store's own tensors for that shard (a meta ``EntryTable`` and
    ``ChunkPool``): per row 8K + 5 B of VHPI metadata (K = the shard's chunks), per slot the
    chunk's floats, a 4 B free-stack entry and the optimizer state, plus a few counters. A rank's
    shards that share a local pool share its counters and its rounding to whole slots, so their
    sum can differ from the pool by under a slot plus the counters per shard.

    Args:
        logical: ``logical_pools(tables, config)``, when the caller already has it.
    """
    logical = logical or logical_pools(tables, config)
    dim = {t.name: t.embedding_dim for t in tables}[table]
    rows, cols = int(size[0]), int(size[1])
    chunk_size = dim // config.num_chunks
    k_local, chunk_offset = cols // chunk_size, int(offset[1]) // chunk_size
    fraction = shard_pool_fraction(logical, table, chunk_offset, k_local)
    slots = pool_slots(fraction * rows * cols, chunk_size)
    meta = torch.device("meta")
    return _buffer_bytes(EntryTable(rows, k_local, meta)) + _buffer_bytes(
        ChunkPool(slots, chunk_size, k_local, config.optimizer, meta)
    )


class FiitedStorageEstimator(EmbeddingStorageEstimator):
    """The stock storage estimate, with each FIITED shard's dense tensor bytes replaced by
    ``fiited_shard_bytes`` (IO buffers are kept as estimated)."""

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None) -> None:
        super().estimate(sharding_options, sharder_data_map)
        logical: Dict[int, LogicalPools] = {}
        for so in sharding_options:
            module = so.module[1]
            if not isinstance(module, FiitedEmbeddingBagCollection):
                continue
            tables = module.embedding_bag_configs()
            if id(module) not in logical:
                logical[id(module)] = logical_pools(tables, module.config)
            for shard in so.shards:
                rows, cols = shard.size
                dense = rows * cols * so.tensor.element_size()
                fiited = fiited_shard_bytes(
                    tables, module.config, so.name, shard.size, shard.offset, logical[id(module)]
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
