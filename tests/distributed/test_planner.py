"""The planner charges FIITED shards the bytes they hold, not the dense table's."""

import pytest
import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.distributed import (
    FiitedEmbeddingBagCollectionSharder,
    FiitedStorageEstimator,
    fiited_shard_bytes,
    make_fiited_planner,
)

ROWS, DIM, K, BUDGET = 200_000, 64, 4, 0.25


def _module(budget=BUDGET):
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f"f{i}"])
        for i in range(4)
    ]
    with torch.device("meta"):  # planning reads configs only; no need to allocate the store
        return FiitedEmbeddingBagCollection(tables, FiitedConfig(num_chunks=K, budget=budget))


def _storage(estimator_cls, sharding_type):
    topology = Topology(world_size=2, compute_device="cpu")
    constraints = {f"t{i}": ParameterConstraints(sharding_types=[sharding_type]) for i in range(4)}
    enumerator = EmbeddingEnumerator(
        topology, 512, constraints, estimator=[estimator_cls(topology, constraints)]
    )
    options = enumerator.enumerate(_module(), [FiitedEmbeddingBagCollectionSharder()])
    return {o.name: [(s.size, s.storage.ddr) for s in o.shards] for o in options}


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "column_wise"])
def test_storage_estimate_is_budget_pools_plus_metadata(sharding_type):
    stock = _storage(EmbeddingStorageEstimator, sharding_type)
    fiited = _storage(FiitedStorageEstimator, sharding_type)
    for table, shards in fiited.items():
        for (size, ddr), (_, stock_ddr) in zip(shards, stock[table]):
            rows, cols = size
            expected = fiited_shard_bytes(rows, cols, DIM, K, BUDGET, "rowwise_adagrad")
            # Same IO buffers, FIITED's bytes instead of the dense shard's.
            assert ddr - expected == stock_ddr - rows * cols * 4
            assert ddr < 0.5 * stock_ddr


def test_fiited_planner_fits_where_the_dense_estimate_does_not():
    # 4 x 200k x 64 fp32 = 205 MB dense; FIITED at 0.25 with K=4 holds ~25 MB per table.
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=80 * 1024**2)
    sharders = [FiitedEmbeddingBagCollectionSharder()]
    with pytest.raises(PlannerError):
        EmbeddingShardingPlanner(topology=topology).plan(_module(), sharders)
    plan = make_fiited_planner(2, topology=topology).plan(_module(), sharders)
    placed = plan.plan[""]
    assert sorted(placed) == ["t0", "t1", "t2", "t3"]
