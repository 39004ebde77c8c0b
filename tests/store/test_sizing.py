"""store/sizing.py: the byte model is exact, ``size_pool`` fits the budget and spends it, and a
budget too small for one bucket and one slot is refused naming the tables."""

import math

import pytest
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.config import DimPruningConfig
from torchrec_fiited.store.sizing import (
    MIN_BUCKET,
    PoolSizes,
    TableSpec,
    default_entries_per_slot,
    entry_bytes,
    full_table_bytes,
    pool_bytes,
    size_pool,
    slot_bytes,
)


def _tables():
    """Two pools at K=2 (chunk sizes 4 and 8): a tiny, a mid and a large table in one."""
    return [
        EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["a"]),
        EmbeddingBagConfig(name="mid", embedding_dim=8, num_embeddings=3_000, feature_names=["b"]),
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=200_000, feature_names=["c"]),
        EmbeddingBagConfig(name="wide", embedding_dim=16, num_embeddings=20_000, feature_names=["d"]),
    ]


def _tensor_bytes(m: FiitedEmbeddingBagCollection, pool: str) -> dict:
    """Bytes of the module's tensors that belong to ``pool``, by component, counted from the
    module itself (steps_done is charged to every pool, as sizing does)."""
    store = m.store
    tables = set(store.tables_of_pool(pool))
    out = {"chunks": 0, "entries": 0, "sketch": 0, "fallback": 0, "dim_maps": 0, "steps_done": 0}
    for name, t in m.named_buffers():
        b = t.numel() * t.element_size()
        parts = name.split(".")
        if name == "steps_done":
            out["steps_done"] += b
        elif parts[:3] == ["store", "pools", pool]:
            out["chunks"] += b
        elif parts[:3] == ["store", "entries", pool]:
            out["entries"] += b
        elif parts[:3] == ["store", "sketches", pool]:
            out["sketch"] += b
        elif parts[:2] == ["store", "fallbacks"] and parts[2] in tables:
            out["fallback"] += b
        elif parts[:2] == ["store", "dim_maps"] and parts[2] in tables:
            out["dim_maps"] += b
    out["total"] = sum(out.values())
    return out


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("miss", ["zeros", "hashed"])
def test_pool_bytes_equals_the_constructed_tensors(num_chunks, optimizer, miss):
    cfg = FiitedConfig(num_chunks=num_chunks, budget=0.05, optimizer=optimizer, miss=miss)
    m = FiitedEmbeddingBagCollection(_tables(), cfg)
    all_names = {n for n, _ in m.named_buffers()}
    seen = {"steps_done"}
    for pool, sizes in m.store.sizes.items():
        specs = [TableSpec(t.name, t.num_embeddings, t.embedding_dim) for t in _tables()
                 if m.store.layouts[t.name].pool == pool]
        want = pool_bytes(sizes, specs, num_chunks, optimizer)
        got = _tensor_bytes(m, pool)
        assert got["total"] == want["total"], (pool, got, want)
        # Component by component where the model and the tensors split alike.
        assert got["sketch"] == want["sketch"] + 8  # + its decay step, a fixed counter
        assert got["fallback"] == want["fallback"]
        assert (miss == "hashed") == (want["fallback"] > 0)
        cp, et = m.store.pools[pool], m.store.entries[pool]
        per_slot = sum(t.numel() * t.element_size() for t in (cp.weights, cp.momentum, cp.free_stack))
        assert per_slot == want["chunks"] == sizes.slots * slot_bytes(cp.chunk_size, optimizer, sizes.slots)
        assert cp.free_stack.element_size() == (2 if sizes.slots <= 2**15 else 4)
        assert et.chunk_slots.dtype == cp.free_stack.dtype
        assert et.capacity == sizes.entries
        seen |= {n for n in all_names if n.startswith((f"store.pools.{pool}.", f"store.entries.{pool}.",
                                                         f"store.sketches.{pool}."))}
        seen |= {n for n in all_names for t in m.store.tables_of_pool(pool)
                 if n.startswith(f"store.fallbacks.{t}.")}
    assert seen == all_names  # no tensor outside the pools' accounts


def test_pool_bytes_with_dim_pruning_and_several_tables_per_pool():
    cfg = FiitedConfig(num_chunks=2, budget=0.1, miss="hashed",
                       dim_pruning=DimPruningConfig(target_ratio=0.5, cold_start_steps=5))
    m = FiitedEmbeddingBagCollection(_tables(), cfg)
    for pool, sizes in m.store.sizes.items():
        specs = [TableSpec(t.name, t.num_embeddings, t.embedding_dim) for t in _tables()
                 if m.store.layouts[t.name].pool == pool]
        want = pool_bytes(sizes, specs, 2, cfg.optimizer, dim_pruning=True)
        assert _tensor_bytes(m, pool)["total"] == want["total"], pool
        assert _tensor_bytes(m, pool)["dim_maps"] > 0


def test_stats_bytes_are_the_module_tensors_and_within_budget():
    cfg = FiitedConfig(num_chunks=2, budget=0.02, miss="hashed")
    m = FiitedEmbeddingBagCollection(_tables(), cfg)
    s = m.stats()["bytes"]
    assert s["total"] == sum(t.numel() * t.element_size() for t in m.buffers())
    assert s["total"] == sum(v for k, v in s.items() if k != "total")
    assert s["other"] == 8  # steps_done
    full = sum(full_table_bytes(t.num_embeddings, t.embedding_dim, cfg.optimizer) for t in _tables())
    assert m.stats()["bytes_full"] == full
    assert s["total"] <= cfg.budget * full


BUDGETS = [0.9, 0.5, 0.1, 0.01, 0.001]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
@pytest.mark.parametrize("optimizer,miss", [("rowwise_adagrad", "zeros"), ("sgd", "hashed"),
                                            ("adagrad", "zeros")])
def test_size_pool_fits_the_budget_and_spends_it(budget, num_chunks, optimizer, miss):
    """Everything but less than one chunk slot of ``budget x full`` is spent, split as the
    docstring says: >= sketch_fraction to the sketch (up to a cell per entry), ~fallback_fraction
    to the fallback (hashed), entries and slots at ``entries_per_slot``."""
    specs = [TableSpec("a", 1_000_000, 16), TableSpec("b", 70_000, 16), TableSpec("c", 5, 16)]
    full = sum(full_table_bytes(t.num_rows, t.dim, optimizer) for t in specs)
    B = budget * full
    sizes = size_pool(specs, budget, num_chunks, optimizer, miss=miss)
    got = pool_bytes(sizes, specs, num_chunks, optimizer)
    c = slot_bytes(16 // num_chunks, optimizer)
    cell = 4 * 2 * num_chunks  # one sketch column: depth 2 x K floats
    assert B - max(c, cell) < got["total"] <= B, (got, B, c)
    # The sketch also takes what rounding the entries to whole buckets leaves over.
    alpha = default_entries_per_slot(num_chunks)
    spare = sizes.bucket_size * (entry_bytes(num_chunks) + c / alpha) + c + cell
    # At least sketch_fraction; grown towards one cell per entry (at most 25% of the budget).
    assert 0.05 * B - cell < got["sketch"]
    assert got["sketch"] <= max(0.05 * B, min(sizes.entries * cell, 0.25 * B)) + spare
    if miss == "hashed":
        per_row = full_table_bytes(1, 16, optimizer)
        assert got["fallback"] <= 0.1 * B
        for t in specs:  # in proportion to each table's full bytes, in whole buckets
            share = 0.1 * B * full_table_bytes(t.num_rows, t.dim, optimizer) / full
            most = int(share // per_row)
            rows = sizes.fallback_rows[t.name]
            assert rows == (math.ceil(t.num_rows / math.ceil(t.num_rows / most)) if most else 0)
            assert most * (1 - most / t.num_rows) - 1 < rows <= most
    else:
        assert got["fallback"] == 0 and not any(sizes.fallback_rows.values())
    alpha = default_entries_per_slot(num_chunks)
    e = entry_bytes(num_chunks)
    W = sizes.bucket_size
    # Entries in whole buckets, nearest to alpha x slots; slots usable by the entries.
    assert sizes.slots <= max(1, sizes.entries * num_chunks * (0.8 if num_chunks == 1 else 1))
    assert sizes.entries >= alpha * sizes.slots - W * (1 + alpha * e / c) - 1
    assert sizes.entries <= alpha * sizes.slots + W * (1 + alpha * e / c) + 1


def test_size_pool_entries_per_slot_and_bucket_size_options():
    specs = [TableSpec("a", 100_000, 8)]
    sizes = size_pool(specs, 0.2, 2, "rowwise_adagrad", entries_per_slot=3.0, bucket_size=64)
    assert sizes.bucket_size == 64
    assert 3.0 * sizes.slots - 64 * 4 <= sizes.entries <= 3.0 * sizes.slots + 64 * 4
    no_sketch = size_pool(specs, 0.2, 2, "rowwise_adagrad", sketch_fraction=0.0)
    assert no_sketch.sketch_width == 0 and no_sketch.slots > size_pool(specs, 0.2, 2, "rowwise_adagrad").slots


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("budget", [0.1, 0.01, 0.001])
def test_the_sketch_grows_to_a_cell_per_entry(num_chunks, budget):
    """A sketch of 5% of a small budget had 23 cells for 111k ids (FIITED at 1000x admitted
    blindly); it now gets about one cell per entry in each row, within 25% of the budget."""
    specs = [TableSpec("a", 60_000, 16), TableSpec("b", 51_000, 16)]
    B = budget * sum(full_table_bytes(t.num_rows, t.dim, "rowwise_adagrad") for t in specs)
    sizes = size_pool(specs, budget, num_chunks, "rowwise_adagrad")
    cell = 2 * 2 * num_chunks  # bf16 cells, depth 2
    assert sizes.sketch_width >= 0.75 * min(sizes.entries, 0.25 * B // cell)
    assert sizes.sketch_width * cell <= 0.25 * B + sizes.bucket_size * (entry_bytes(num_chunks) + 72)
    assert size_pool(specs, budget, num_chunks, "rowwise_adagrad", sketch_fraction=0.0).sketch_width == 0


def test_entries_never_fall_below_the_slots_they_serve():
    """Rounding entries to whole buckets must not leave K=1 with more slots than entries: those
    slots are never used and a table that never fills never evicts (AdaEmbed at 1000x kept its
    first ids for the whole run)."""
    for budget in (0.001, 0.0013, 0.002, 0.005, 0.01, 0.05):
        specs = [TableSpec("a", 60_000, 16), TableSpec("b", 51_000, 16)]
        sizes = size_pool(specs, budget, 1, "rowwise_adagrad")
        assert sizes.slots <= 0.8 * sizes.entries, (budget, sizes)


def test_small_pools_shrink_their_buckets_to_the_minimum():
    """A pool with few entries gets buckets of 8 (not 32 with one bucket mostly empty) and still
    fits its budget."""
    specs = [TableSpec("t", 100, 4)]
    sizes = size_pool(specs, 0.5, 2, "sgd")
    assert sizes.bucket_size < 32 and sizes.bucket_size >= MIN_BUCKET
    assert pool_bytes(sizes, specs, 2, "sgd")["total"] <= 0.5 * full_table_bytes(100, 4, "sgd")


def test_too_small_budget_names_the_tables():
    specs = [TableSpec("user_id", 10, 8), TableSpec("item_id", 20, 8)]
    with pytest.raises(ValueError, match=r"user_id.*item_id|item_id.*user_id") as err:
        size_pool(specs, 0.01, 2, "rowwise_adagrad")
    assert "budget 0.01" in str(err.value)
    # One byte short of one bucket of 8 entries and one slot, and exactly that.
    fixed = pool_bytes(PoolSizes(0, 0, 8, 0), specs, 2, "rowwise_adagrad")["fixed"]
    need = fixed + MIN_BUCKET * entry_bytes(2, 1) + slot_bytes(4, "rowwise_adagrad", 1)
    with pytest.raises(ValueError, match="user_id"):
        size_pool(specs, 1.0, 2, "rowwise_adagrad", sketch_fraction=0.0, budget_bytes=need - 1)
    ok = size_pool(specs, 1.0, 2, "rowwise_adagrad", sketch_fraction=0.0, budget_bytes=need)
    assert ok.slots == 1 and ok.entries == MIN_BUCKET


def test_too_small_budget_is_refused_by_the_module_naming_the_tables():
    tables = [EmbeddingBagConfig(name="user_id", embedding_dim=8, num_embeddings=10, feature_names=["u"]),
              EmbeddingBagConfig(name="item_id", embedding_dim=8, num_embeddings=20, feature_names=["i"])]
    with pytest.raises(ValueError, match="user_id"):
        FiitedEmbeddingBagCollection(tables, FiitedConfig(num_chunks=2, budget=0.01))


@pytest.mark.parametrize("num_rows", [10**5, 10**6, 10**7])
def test_sizes_follow_the_budget_not_the_id_space(num_rows):
    """Store v2: a pool's tensors are sized by bytes; at a fixed byte budget a 10^7-row table
    allocates what a 10^5-row one does."""
    specs = [TableSpec("t", num_rows, 16)]
    sizes = size_pool(specs, 1.0, 2, "rowwise_adagrad", budget_bytes=200_000)
    assert sizes == size_pool([TableSpec("t", 10**5, 16)], 1.0, 2, "rowwise_adagrad", budget_bytes=200_000)
    total = pool_bytes(sizes, specs, 2, "rowwise_adagrad")["total"]
    assert 200_000 - slot_bytes(8, "rowwise_adagrad") < total <= 200_000
