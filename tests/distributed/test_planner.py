"""The planner charges FIITED shards the bytes the sharded module allocates, not the dense table's."""

import pytest
import torch
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from tests.distributed import cases
from tests.distributed.harness import run_ranks
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.distributed import (
    FiitedEmbeddingBagCollectionSharder,
    FiitedStorageEstimator,
    fiited_shard_bytes,
    make_fiited_planner,
)
from torchrec_fiited.store.sizing import full_table_bytes

ROWS, DIM, K, BUDGET = 200_000, 64, 4, 0.25
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
# Default manual mode: ratios fitted to budget 0.25 are (.275, .825, .95, .95), so a column shard
# holding chunks 0-1 keeps (0.725 + 0.175) / 2 = 0.45 of its floats, and chunks 2-3 keep 0.05.
PLANNER_CONFIG = dict(num_chunks=K, budget=BUDGET, prune_interval=0)


def _meta_module(tables, config):
    with torch.device("meta"):  # planning reads configs only; no need to allocate the store
        return FiitedEmbeddingBagCollection(tables, FiitedConfig(**config))


def _constraints(tables, sharding_type):
    # Column-wise in halves: two shards of two chunks each per table.
    return {
        t.name: ParameterConstraints(
            sharding_types=[sharding_type],
            min_partition=t.embedding_dim // 2 if sharding_type == "column_wise" else None,
        )
        for t in tables
    }


def _shard_storage(estimator_cls, module, constraints):
    """(table, shard offset) -> (shard size, estimated ddr bytes)."""
    topology = Topology(world_size=2, compute_device="cpu")
    enumerator = EmbeddingEnumerator(
        topology, 8, constraints, estimator=[estimator_cls(topology, constraints)]
    )
    options = enumerator.enumerate(module, [FiitedEmbeddingBagCollectionSharder()])
    return {
        (o.name, tuple(s.offset)): (tuple(s.size), s.storage.ddr) for o in options for s in o.shards
    }


def _tensor_estimates(module, constraints):
    """What the FIITED estimator charges each shard for its tensors: its storage estimate less the
    IO buffers, which are torchrec's (the stock estimate less the dense shard)."""
    fiited = _shard_storage(FiitedStorageEstimator, module, constraints)
    stock = _shard_storage(EmbeddingStorageEstimator, module, constraints)
    return {
        key: ddr - (stock[key][1] - size[0] * size[1] * 4) for key, (size, ddr) in fiited.items()
    }


# With miss="hashed" every shard also holds its buckets of its table's fallback (a row shard:
# those that meet its hash range, one more where a boundary cuts a bucket).
@pytest.mark.parametrize("config", [PLANNER_CONFIG, dict(PLANNER_CONFIG, miss="hashed")],
                         ids=["zeros", "hashed"])
def test_estimate_equals_the_bytes_the_sharded_module_allocates(config):
    """Table-, row- and column-wise plans from the FIITED planner, sharded on 2 gloo ranks: each
    rank's FIITED tensors (after a training step) are what the estimator charged its shards.

    Exact but for what one shard cannot know: shards of a rank sharing a local pool share its
    counters (num_free, live_per_chunk: 8 + 8K B) and its rounding to whole slots (under one slot
    per shard), and each local lookup has an 8 B step counter.
    """
    tables = cases.planner_tables()
    module = _meta_module(tables, config)
    sharders = [FiitedEmbeddingBagCollectionSharder()]
    plans, estimates, placements = {}, {}, {}
    for st in SHARDING_TYPES:
        constraints = _constraints(tables, st)
        plans[st] = make_fiited_planner(2, "cpu", 8, constraints).plan(module, sharders)
        estimates[st] = _tensor_estimates(module, constraints)
        placements[st] = [
            (t, tuple(md.shard_offsets), tuple(md.shard_sizes), md.placement.rank())
            for t, ps in plans[st].plan[""].items()
            for md in ps.sharding_spec.shards
        ]
        assert {ps.sharding_type for ps in plans[st].plan[""].values()} == {st}
    dims = {t.name: t.embedding_dim for t in tables}
    assert all(size[1] == dims[t] // 2 for t, _, size, _ in placements["column_wise"])
    got = run_ranks(cases.sharded_bytes, 2, config, plans)
    for st in SHARDING_TYPES:
        for rank in range(2):
            mine = [p for p in placements[st] if p[3] == rank]
            estimated = sum(estimates[st][(t, off)] for t, off, _, _ in mine)
            actual = got[rank][st]
            assert actual["stats_total"] == actual["lookup_bytes"]
            # Outside the lookups only torchrec's row-wise input dist holds a tensor: the
            # bucketization block size of each feature (int64).
            assert actual["tensor_bytes"] - actual["lookup_bytes"] <= 8 * len(tables)
            slack = 8 * actual["lookups"]
            for t, _, size, _ in mine:
                cs = dims[t] // K
                k_local = size[1] // cs
                slack += (cs * 4 + 4 + 4) + 8 + 8 * k_local  # a rowwise-Adagrad slot + pool counters
            assert abs(actual["lookup_bytes"] - estimated) <= slack, (st, rank, actual, estimated)
            assert abs(actual["lookup_bytes"] - estimated) <= 0.01 * estimated


def test_fiited_planner_fits_where_the_dense_estimate_does_not():
    # 4 x 200k x 64 fp32 = 205 MB dense; FIITED at 0.25 with K=4 holds ~25 MB per table.
    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=ROWS, embedding_dim=DIM, feature_names=[f"f{i}"])
        for i in range(4)
    ]
    module = _meta_module(tables, dict(num_chunks=K, budget=BUDGET))
    topology = Topology(world_size=2, compute_device="cpu", ddr_cap=80 * 1024**2)
    sharders = [FiitedEmbeddingBagCollectionSharder()]
    with pytest.raises(PlannerError):
        EmbeddingShardingPlanner(topology=topology).plan(module, sharders)
    plan = make_fiited_planner(2, topology=topology).plan(module, sharders)
    placed = plan.plan[""]
    assert sorted(placed) == ["t0", "t1", "t2", "t3"]
    # And it trains: each rank's FIITED tensors, after a step, within the 80 MB it was given.
    config = dict(num_chunks=K, budget=BUDGET)
    for got in run_ranks(cases.sharded_bytes, 2, config, {"fit": plan}, tables):
        assert 0 < got["fit"]["tensor_bytes"] <= 80 * 1024**2
        assert got["fit"]["stats_total"] == got["fit"]["lookup_bytes"]


def test_a_shard_too_small_for_a_pool_of_its_own_is_charged_its_share():
    # 12 rows at budget 0.25 are 204 B: no room for a bucket of entries and a slot, but such a
    # shard joins the local pool of its rank's other shards of the pool (e.g. the 26 small
    # tables of the app, row-wise), to which it brings its share of the budget.
    tables = cases.planner_tables() + [
        EmbeddingBagConfig(name="tiny", num_embeddings=12, embedding_dim=16, feature_names=["f9"])
    ]
    config = FiitedConfig(**PLANNER_CONFIG)
    share = int(BUDGET * full_table_bytes(12, 16, config.optimizer))
    assert fiited_shard_bytes(tables, config, "tiny", (12, 16), (0, 0)) == share == 204
    # A shard with room for a pool of its own is charged that pool's bytes: within a slot of
    # its share (the largest whole number of slots).
    t0 = fiited_shard_bytes(tables, config, "t0", (1000, 16), (0, 0))
    assert BUDGET * full_table_bytes(1000, 16, config.optimizer) - 24 < t0 <= 17000
