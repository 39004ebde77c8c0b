"""Pool planning: logical pools for the thresholds, local pools for what a shard allocates."""

import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited import FiitedConfig
from torchrec_fiited.modules.layout_plan import TableShard, plan_pools

TABLE = EmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"])


def _column_shards(config):
    halves = [
        EmbeddingBagConfig(name=f"t@c{c}", num_embeddings=1000, embedding_dim=8, feature_names=[f"f@c{c}"])
        for c in (0, 8)
    ]
    plans = [
        plan_pools([h], config, {h.name: TableShard("t", 0, c)}, [TABLE])
        for h, c in zip(halves, (0, 8))
    ]
    return [next(iter(p.capacities.values())) for p in plans], plans


def test_column_shards_get_the_slots_their_chunks_keep_once_every_row_is_seen():
    # Ratios (0, .5, .5, .5) split a 3600-slot pool 1440/720/720/720, but chunk 0 cannot use more
    # than its 1000 rows: water-filling gives it 1000 and the others 866.67 each.
    config = FiitedConfig(num_chunks=4, budget=0.9, chunk_prune_ratios=[0.0, 0.5, 0.5, 0.5])
    (first, second), plans = _column_shards(config)
    logical_capacity = plans[0].logical["shared_cs4"][0]
    assert logical_capacity == 3600
    assert (first, second) == (1866, 1733)
    assert logical_capacity - 2 <= first + second <= logical_capacity
    assert plans[1].layouts[0].chunk_offset == 2 and plans[1].num_chunks == 2


def test_dynamic_column_shards_split_evenly():
    config = FiitedConfig(num_chunks=4, budget=0.25, ratio_mode="dynamic")
    (first, second), _ = _column_shards(config)
    assert first == second == 500


def test_a_column_shard_must_hold_whole_chunks():
    half = EmbeddingBagConfig(name="t@c6", num_embeddings=1000, embedding_dim=6, feature_names=["g"])
    with pytest.raises(ValueError, match="does not hold whole chunks of 4 columns"):
        plan_pools([half], FiitedConfig(num_chunks=4), {half.name: TableShard("t", 0, 6)}, [TABLE])


def test_row_shards_get_budget_times_their_rows():
    rows = EmbeddingBagConfig(name="t", num_embeddings=400, embedding_dim=16, feature_names=["f"])
    plan = plan_pools([rows], FiitedConfig(num_chunks=4, budget=0.25), {"t": TableShard("t", 600, 0)}, [TABLE])
    assert plan.capacities == {"shared_cs4": 400} and plan.logical["shared_cs4"][0] == 1000
    assert plan.layouts[0].row_offset == 600
