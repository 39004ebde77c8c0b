"""Planning FIITED tables by the memory they really hold.

TorchRec's planner charges a table its dense ``rows x dim`` bytes (``ModuleSharder.storage_usage``
is not consulted in 1.8), so ``FiitedStorageEstimator`` rewrites the storage of FIITED shards
after the stock estimate, and ``make_fiited_planner`` wires it into an ``EmbeddingShardingPlanner``.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

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
    fallback_widths,
    logical_pools,
    shard_budget,
    sizing_options,
)
from torchrec_fiited.store.fallback import FallbackGrid
from torchrec_fiited.store.sizing import TableSpec, pool_bytes, size_pool


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

    The sharded module's rule (``layout_plan.plan_pools``): the shard's local pool gets
    ``layout_plan.shard_pool_fraction`` of the shard's full bytes (fp32 weights plus optimizer
    state; a column shard the water-filled share of its chunk range) and ``store.sizing.size_pool``
    splits them into chunk slots, hash-table entries, sketch, fallback and counters; the charge
    is ``store.sizing.pool_bytes`` of those sizes, computed without building anything. A rank's
    shards of one logical pool and chunk range share one local pool, sized to the sum of their
    shares: so their sum can differ from the pool by under a slot plus the counters per shard,
    and a shard whose share is too small for a pool of its own (a bucket of entries and a slot)
    is charged its share, the bytes it brings to the pool it joins. (Where the rank's pool as a
    whole is too small, building the sharded module says so.)

    Args:
        logical: ``logical_pools(tables, config)``, when the caller already has it.
    """
    logical = logical or logical_pools(tables, config)
    config_of = {t.name: t for t in tables}[table]
    dim, id_space = config_of.embedding_dim, config_of.num_embeddings
    rows, cols = int(size[0]), int(size[1])
    chunk_size = dim // config.num_chunks
    k_local, chunk_offset = cols // chunk_size, int(offset[1]) // chunk_size
    spec = [TableSpec(table, rows, cols)]
    budget_bytes, cells = shard_budget(logical, table, chunk_offset, k_local, rows, cols, dim,
                                       config.optimizer)
    options = sizing_options(config)
    row = int(offset[0])  # a row-wise shard's hash range starts there (0 for a whole table)
    width = fallback_widths(tables, logical)[table]
    fallback = {table: FallbackGrid(id_space, width, row, row + rows).rows}
    try:
        sizes = size_pool(
            spec, 1.0, k_local, config.optimizer, budget_bytes=budget_bytes,
            fallback_rows=fallback, sketch_width=None if cells is None else int(cells), **options,
        )
    except ValueError:
        return int(budget_bytes)
    return pool_bytes(sizes, spec, k_local, config.optimizer, options["dim_pruning"])["total"]


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
