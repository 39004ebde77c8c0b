"""Planner constraints from ``train.sharding_type`` (the 2-process runs are in
test_distributed_app.py)."""

import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited.app.sharding import sharding_constraints
from torchrec_fiited.app.specs import TrainSpec

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=10, feature_names=[f"f{i}"])
          for i in range(2)]


def test_a_chosen_type_constrains_every_table():
    constraints = sharding_constraints(TABLES, "row_wise", "cpu")
    assert {name: c.sharding_types for name, c in constraints.items()} == {
        "t0": ["row_wise"], "t1": ["row_wise"]}


def test_planner_choice_on_cpu_excludes_data_parallel():
    # ShardedFusedEmbeddingBagCollection wraps data-parallel tables in DDP(device_ids=[cpu]).
    types = sharding_constraints(TABLES, None, "cpu")["t0"].sharding_types
    assert "data_parallel" not in types and "table_wise" in types
    assert sharding_constraints(TABLES, None, "cuda") is None


def test_unknown_sharding_type_is_rejected():
    with pytest.raises(ValueError, match=r"train.sharding_type must be null or one of "
                                         r"\['table_wise', 'row_wise', 'column_wise'\], got 'twrw'"):
        TrainSpec(sharding_type="twrw")


def test_column_wise_fiited_tables_split_into_whole_chunks():
    # K=2, D=8: one chunk (4 columns) per rank on 2 ranks; on 1 rank the table stays whole.
    two = sharding_constraints(TABLES, "column_wise", "cpu", world_size=2, num_chunks=2)
    assert two["t0"].min_partition == 4
    assert sharding_constraints(TABLES, "column_wise", "cpu", 1, 2)["t0"].min_partition == 8
    # K=4 on 2 ranks: two chunks per shard; not FIITED (no K): torchrec's default.
    assert sharding_constraints(TABLES, "column_wise", "cpu", 2, 4)["t0"].min_partition == 4
    assert sharding_constraints(TABLES, "column_wise", "cpu", 2)["t0"].min_partition is None
