"""Pool planning: logical pools for the thresholds, local pools for what a shard allocates.

Store v2: a pool's sizes come from ``store.sizing.size_pool`` (every byte counted), so a local
pool is sized from the bytes it is charged: ``shard_pool_fraction`` x its full bytes.
"""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited import FiitedConfig
from torchrec_fiited.modules.layout_plan import (
    TableShard,
    logical_pools,
    plan_pools,
    shard_budget,
    shard_full_bytes,
    shard_pool_fraction,
    sizing_options,
)
from torchrec_fiited.store import VHPIStore, key_row
from torchrec_fiited.store.sizing import TableSpec, full_table_bytes, pool_bytes, size_pool

TABLE = EmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"])
OPT = "rowwise_adagrad"


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


def _charged(plan, fraction, rows, dim, config):
    """The local pool's sizes are size_pool's for the shard's budget (``fraction`` of its full
    bytes; a column shard with a sketch: its part of the logical sketch and the fraction of the
    rest, ``shard_budget``), and its tensors fit those bytes."""
    (pool, sizes), = plan.sizes.items()
    spec = [TableSpec(plan.layouts[0].name, rows, dim)]
    K = plan.num_chunks
    layout = plan.layouts[0]
    logical = logical_pools([TABLE], config)
    charged, cells = shard_budget(logical, "t", layout.chunk_offset, K, rows, dim,
                                  TABLE.embedding_dim, OPT)
    if cells is None:
        assert charged == fraction * shard_full_bytes(rows, dim, TABLE.embedding_dim, OPT)
    else:
        assert cells == logical.sizes["shared_cs4"].sketch_width * rows / 1000
    assert sizes == size_pool(spec, 1.0, K, OPT, budget_bytes=charged,
                              sketch_width=None if cells is None else int(cells),
                              **sizing_options(config))
    assert pool_bytes(sizes, spec, K, OPT)["total"] <= charged
    assert plan.capacities[pool] == sizes.slots


def test_column_shards_get_the_slots_their_chunks_keep_once_every_row_is_seen():
    # Ratios (0, .95, .95, .95) would give chunk 0 more slots than the table has rows: water-
    # filling gives it every row (keep 1) and splits the rest evenly over chunks 1..3.
    # (No sketch: its bytes would leave the pool fewer slots than rows.)
    config = FiitedConfig(num_chunks=4, budget=1.0, chunk_prune_ratios=[0.0, 0.95, 0.95, 0.95],
                          sketch_fraction=0.0)
    (first, second), plans = _column_shards(config)
    logical = logical_pools([TABLE], config)
    capacity, policy = logical.pools["shared_cs4"]
    assert plans[0].logical["shared_cs4"][0] == capacity == logical.sizes["shared_cs4"].slots
    assert capacity > 1000
    keep = policy.keep_fractions(capacity, 1000)
    rest = (capacity - 1000) / 3000
    torch.testing.assert_close(keep, torch.tensor([1.0, rest, rest, rest], dtype=torch.float64))
    fractions = [shard_pool_fraction(logical, "t", 0, 2), shard_pool_fraction(logical, "t", 2, 2)]
    # The budget weighted by what the pool keeps of each chunk range against all K: the two
    # halves together get the table's budget (here 1.0, so the first half is capped at 1).
    mean = (1.0 + 3 * rest) / 4
    assert fractions == pytest.approx([min(1.0, (1.0 + rest) / 2 / mean), rest / mean])
    half_full = full_table_bytes(1000, 16, OPT) / 2
    assert sum(f * half_full for f in fractions) <= 1.0 * full_table_bytes(1000, 16, OPT)
    for plan, fraction in zip(plans, fractions):
        _charged(plan, fraction, 1000, 8, config)
    assert first > second
    assert plans[1].layouts[0].chunk_offset == 2 and plans[1].num_chunks == 2


def test_dynamic_column_shards_split_evenly():
    config = FiitedConfig(num_chunks=4, budget=0.25, ratio_mode="dynamic")
    (first, second), plans = _column_shards(config)
    assert first == second > 0
    for plan in plans:
        _charged(plan, 0.25, 1000, 8, config)


def test_a_column_shard_must_hold_whole_chunks():
    half = EmbeddingBagConfig(name="t@c6", num_embeddings=1000, embedding_dim=6, feature_names=["g"])
    with pytest.raises(ValueError, match="does not hold whole chunks of 4 columns"):
        plan_pools([half], FiitedConfig(num_chunks=4), {half.name: TableShard("t", 0, 6)}, [TABLE])


def test_row_shards_get_budget_times_their_rows():
    config = FiitedConfig(num_chunks=4, budget=0.25)
    rows = EmbeddingBagConfig(name="t", num_embeddings=400, embedding_dim=16, feature_names=["f"])
    plan = plan_pools([rows], config, {"t": TableShard("t", 600, 0)}, [TABLE])
    logical = size_pool([TableSpec("t", 1000, 16)], 0.25, 4, OPT, **sizing_options(config))
    assert plan.logical["shared_cs4"][0] == logical.slots
    _charged(plan, 0.25, 400, 16, config)
    assert plan.sizes["shared_cs4"] == size_pool([TableSpec("t", 400, 16)], 0.25, 4, OPT, **sizing_options(config))
    assert plan.layouts[0].row_offset == 600
    # Keys carry the global row: the shard's local row 0 is the table's row 600.
    store = VHPIStore(plan.layouts, plan.sizes, plan.num_chunks, OPT, torch.device("cpu"))
    assert key_row(store.keys("t", torch.tensor([0, 399]))).tolist() == [600, 999]
