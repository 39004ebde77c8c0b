"""FIITED-2D: dimension utilities, cold start, pruned dims read zero, pools really shrink, revisits
bring dims back re-initialised, table vs global scope, checkpoints round-trip."""

import io
import warnings

import pytest
import torch

from tests.conftest import make_tables, module_bytes, random_kjt
from torchrec_fiited import DimPruningConfig, FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.modules.layout_plan import TableShard, plan_pools
from torchrec_fiited.policy import PoolColumns, global_widths
from torchrec_fiited.store import key_row
from torchrec_fiited.store.logical import export_table

K = 2
# make_tables(): t0 (D=8, features f0, f1) and t2 (D=8) share pool shared_cs4; t1 (D=16) has shared_cs8.
TABLE_OF = {"f0": "t0", "f1": "t0", "f2": "t1", "f3": "t2"}
WIDTHS = {"f0": 8, "f1": 8, "f2": 16, "f3": 8}
FEATURES = list(TABLE_OF)


def _config(**dims) -> FiitedConfig:
    optimizer = dims.pop("optimizer", "rowwise_adagrad")
    chunk = dims.pop("chunk", {})
    return FiitedConfig(
        num_chunks=K, budget=chunk.pop("budget", 1.0), prune_interval=chunk.pop("prune_interval", 0),
        sample_size=64, decay=0.9, enforce_ratio=0.0, optimizer=optimizer, learning_rate=0.05,
        seed=5, dim_pruning=DimPruningConfig(**{"target_ratio": 0.5, "cold_start_steps": 3, **dims}),
    )


def _batches(n, seed=0, batch_size=8, rows=40):
    gen = torch.Generator().manual_seed(seed)
    return [random_kjt(make_tables(rows=rows), batch_size=batch_size, gen=gen, max_len=3) for _ in range(n)]


def _step(m, kjt, column_weight=None):
    """One training step; ``column_weight`` fp32 [sum D] makes grad[b, d] = column_weight[d]."""
    out = m(kjt).values()
    loss = out.pow(2).sum() if column_weight is None else (out * column_weight).sum()
    loss.backward()
    return out.detach()


def _emphasis(strong_columns_by_feature, weak=0.01):
    """Column weights [sum D]: 1 on the given columns of each feature's block, ``weak`` elsewhere."""
    blocks = []
    for f in FEATURES:
        w = torch.full((WIDTHS[f],), weak)
        w[list(strong_columns_by_feature.get(f, []))] = 1.0
        blocks.append(w)
    return torch.cat(blocks)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_cold_start_at_full_width_then_bytes_drop_at_the_event(optimizer):
    m = FiitedEmbeddingBagCollection(make_tables(), _config(optimizer=optimizer))
    start = m.stats()
    for i, kjt in enumerate(_batches(5), start=1):
        _step(m, kjt)
        stats = m.stats()
        b = stats["bytes"]
        assert sum(v for k, v in b.items() if k != "total") == b["total"] == module_bytes(m)
        widths = {t: s["active_dim"] for t, s in stats["tables"].items()}
        if i < 3:  # cold start: full width, nothing moved
            assert widths == {"t0": 8, "t1": 16, "t2": 8}
            assert b == start["bytes"]
            assert all(s["dim_decision_step"] == -1 for s in stats["tables"].values())
        else:  # the event ran in the backward of step 3: half the columns, half the pool bytes
            assert widths == {"t0": 4, "t1": 8, "t2": 4}
            assert all(s["dim_decision_step"] == 3 for s in stats["tables"].values())
    pools = m.store.pools
    assert b["chunks"] == start["bytes"]["chunks"] // 2
    per_column_state = {"adagrad": 1, "rowwise_adagrad": 0, "sgd": 0}[optimizer]
    assert start["bytes"]["optimizer"] - b["optimizer"] == per_column_state * start["bytes"]["chunks"] // 2
    # Metadata: only the column maps shrink, int64 [K, cs] -> [K, cs / 2] per table; entries,
    # sketch, free stacks and counters keep their sizes.
    assert start["bytes"]["dim_maps"] - b["dim_maps"] == 8 * K * (2 + 4 + 2)
    for component in ("free_stacks", "entries", "sketch", "fallback", "other"):
        assert b[component] == start["bytes"][component], component
    for name, pool in pools.items():
        assert pool.weights.shape == (pool.capacity, pool.chunk_size // 2)
        assert stats["pools"][name]["stored_chunk_size"] == pool.chunk_size // 2
        # The fused optimizer updates the new tensors, not the freed ones.
        assert m.fused_optimizer.params[f"pools.{name}.weights"] is pool.weights
        if pool.momentum.numel():
            assert next(iter(m.fused_optimizer.state[pool.weights].values())) is pool.momentum
    assert m.store.invariant_errors() == []


def test_pruned_dims_read_zero_and_kept_values_survive_compaction():
    m = FiitedEmbeddingBagCollection(make_tables(), _config(cold_start_steps=1000, optimizer="adagrad"))
    for kjt in _batches(4):
        _step(m, kjt)
    before = m.dense_weights()
    decision = m.prune_dims()
    after = m.dense_weights()
    for table, d in decision.items():
        cs = m.store.layouts[table].chunk_size
        kept = torch.zeros(K, cs, dtype=torch.bool)
        kept.scatter_(1, torch.tensor(d["kept"]), True)
        kept = kept.reshape(-1)
        assert d["active_dim"] == int(kept.sum()) == m.store.layouts[table].dim // 2
        assert torch.equal(after[table][:, kept], before[table][:, kept])  # values moved, not changed
        assert bool((after[table][:, ~kept] == 0).all())
        # The exported (resident rows') form holds the same values; other rows read zeros.
        logical = export_table(m.store, table)
        rows = logical["rows"]
        assert rows.numel() > 0
        assert torch.equal(logical["weight"], after[table][rows])
        others = torch.ones(after[table].shape[0], dtype=torch.bool)
        others[rows] = False
        assert bool((after[table][others] == 0).all())
        assert bool((logical["momentum"][:, ~kept] == 0).all())  # adagrad state is per column
    for phase in ("train", "eval"):
        m.train(phase == "train")
        out = m(_batches(1, seed=9)[0])
        blocks = out.to_dict()
        for f, table in TABLE_OF.items():
            block = blocks[f]
            cs = m.store.layouts[table].chunk_size
            kept_cols = [k * cs + c for k, cols in enumerate(decision[table]["kept"]) for c in cols]
            pruned = [c for c in range(block.shape[1]) if c not in kept_cols]
            assert bool((block[:, pruned] == 0).all()), (phase, f)
            assert bool((block[:, kept_cols] != 0).any()), (phase, f)
        if phase == "train":
            out.values().sum().backward()


def test_utilities_are_summed_squared_gradients_and_rank_the_columns():
    m = FiitedEmbeddingBagCollection(make_tables(), _config(cold_start_steps=2))
    # f2 (t1, chunk size 8): strong columns 1, 2, 6 of chunk 0 and 9, 12 of chunk 1.
    weight = _emphasis({"f2": [1, 2, 6, 9, 12], "f3": [0, 5], "f0": [3], "f1": [3, 7]})
    batches = _batches(2, batch_size=6)
    _step(m, batches[0], weight)
    t1 = m.store.dim_maps["t1"].utilities
    # One feature, 6 bags: u_d = 6 * w_d ** 2 after one step (the paper's squared-gradient sum).
    torch.testing.assert_close(t1.reshape(-1), 6 * weight[16:32] ** 2)
    _step(m, batches[1], weight)  # step 2 ends the cold start
    kept = {t: m.store.dim_maps[t].kept.tolist() for t in ("t0", "t1", "t2")}
    # Each chunk keeps its strong columns, then weak ones (equal utilities) from the lowest.
    assert kept["t1"] == [[0, 1, 2, 6], [0, 1, 2, 4]]
    # t0 is fed by f0 and f1: column 3 is strong in both, column 7 (chunk 1's 3) in f1 only.
    assert kept["t0"] == [[0, 3], [0, 3]]
    assert kept["t2"] == [[0, 1], [0, 1]]


def test_shared_columns_give_a_pools_tables_one_set_by_summed_utility():
    m = FiitedEmbeddingBagCollection(make_tables(), _config(cold_start_steps=1, shared_columns=True))
    _step(m, _batches(1, batch_size=6)[0], _emphasis({"f0": [3], "f1": [3, 7], "f3": [0, 5]}))
    # Pool shared_cs4: t0 wants (3 | 3), t2 (0 | 1); together each chunk keeps both wishes.
    assert m.store.dim_maps["t0"].kept.tolist() == m.store.dim_maps["t2"].kept.tolist() == [[0, 3], [1, 3]]


def test_revisit_brings_a_dim_back_reinitialised():
    cfg = _config(cold_start_steps=2, revisit_interval=3, decay=0.3)
    m = FiitedEmbeddingBagCollection(make_tables(), cfg)
    batches = _batches(5, batch_size=6)
    first = _emphasis({"f2": [0, 1, 2, 3, 8, 9, 10, 11]})
    for kjt in batches[:2]:
        _step(m, kjt, first)
    assert m.store.dim_maps["t1"].kept.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    old = m.dense_weights()["t1"]
    later = _emphasis({"f2": [4, 5, 6, 7, 8, 9, 10, 11]})  # chunk 0's pruned columns turn hot
    for kjt in batches[2:5]:
        _step(m, kjt, later)
    # Step 5 was the revisit (2 + 3).
    dm = m.store.dim_maps["t1"]
    assert dm.kept.tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert int(dm.last_decision_step) == 5
    new = m.dense_weights()["t1"]
    et = m.store.entries_of("t1")
    entries = m.store.table_entries("t1")

    def live_rows(k):  # rows of t1 whose chunk k is live
        return key_row(et.keys_of(entries[et.chunk_slots[entries, k] >= 0]))

    rows = live_rows(0)
    assert rows.numel() > 0
    ks = torch.zeros_like(rows)
    expected = m.store.init_values("t1", rows, ks, 5)  # counter-based init at the revisit step
    torch.testing.assert_close(new[rows][:, 4:8], expected, rtol=0, atol=0)
    assert not torch.equal(new[rows][:, 4:8], old[rows][:, 4:8])  # they were zeros
    assert bool((new[:, 0:4] == 0).all())  # the dims that went cold now read zero
    table = make_tables()[1]
    low, high = table.get_weight_init_min(), table.get_weight_init_max()
    assert bool(((expected >= low) & (expected <= high)).all())
    # Chunk 1 kept its columns throughout: trained values, not re-initialised ones.
    rows_1 = live_rows(1)
    assert rows_1.numel() > 0
    fresh_1 = m.store.init_values("t1", rows_1, torch.ones_like(rows_1), 5)
    assert bool((new[rows_1][:, 8:12] != fresh_1).all())


def test_global_scope_gives_the_columns_to_the_pool_that_uses_them():
    weight = _emphasis({"f2": range(16)}, weak=1e-3)  # t1's pool matters, the other hardly
    got = {}
    for scope in ("table", "global"):
        m = FiitedEmbeddingBagCollection(make_tables(), _config(scope=scope, cold_start_steps=2))
        for kjt in _batches(2):
            _step(m, kjt, weight)
        got[scope] = {t: s["active_dim"] for t, s in m.stats()["tables"].items()}
        pools = m.store.pools
        full = sum(p.capacity * p.chunk_size for p in pools.values())
        kept = sum(p.capacity * p.stored_width for p in pools.values())
        assert kept >= 0.5 * full  # never prunes more than the target
    assert got["table"] == {"t0": 4, "t1": 8, "t2": 4}
    # shared_cs4 has 46 slots of 4, shared_cs8 14 of 8 (store v2 at budget 1.0 on these small
    # tables): keeping t1 whole (112 floats) and one column per chunk of the other pool (46)
    # stores 158 of 296 floats, at least half; table scope halves each pool.
    assert got["global"] == {"t0": 2, "t1": 16, "t2": 2}


def test_global_widths_by_hand():
    pools = {
        "a": PoolColumns([torch.tensor([[8.0, 4.0, 2.0, 1.0]])], capacity=10, chunk_size=4),
        "b": PoolColumns([torch.tensor([[1.0, 1.0, 1.0, 1.0]])], capacity=20, chunk_size=4),
    }
    # 120 floats; keep 60. Gains per float: a's ranks 0.4, 0.2, 0.1; b's 0.05 each.
    assert global_widths(pools, 0.5) == {"a": 4, "b": 1}
    # Keep 90: 60 + 20 falls short, so b keeps a third rank (100 kept: never more than the target).
    assert global_widths(pools, 0.25) == {"a": 4, "b": 3}
    assert global_widths(pools, 0.0) == {"a": 4, "b": 4}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad"])
def test_checkpoint_of_a_pruned_module_resumes_bitwise(optimizer):
    cfg = _config(optimizer=optimizer, cold_start_steps=4, revisit_interval=4, decay=0.5,
                  chunk={"budget": 0.4, "prune_interval": 3})
    # 400-row tables: at budget 0.4 the pools fill, and cycles evict, regrow and erase entries.
    tables = lambda: make_tables(rows=400)  # noqa: E731
    batches = _batches(14, seed=3, rows=400)
    straight = FiitedEmbeddingBagCollection(tables(), cfg)
    expected = [_step(straight, b) for b in batches]

    first = FiitedEmbeddingBagCollection(tables(), cfg)
    for b in batches[:7]:  # past the first decision (4) and two chunk cycles (3, 6)
        _step(first, b)
    cycle = first.stats()["tables"]
    assert sum(t["erased_last_cycle"] + t["evictions_last_cycle"] + t["allocations_last_cycle"]
               for t in cycle.values()) > 0
    resumed = FiitedEmbeddingBagCollection(tables(), cfg)  # fresh: still full width
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    resumed.fused_optimizer.load_state_dict(_roundtrip(first.fused_optimizer.state_dict()))
    assert resumed.store.pools["shared_cs8"].weights.shape == (first.store.pools["shared_cs8"].capacity, 4)
    got = [_step(resumed, b) for b in batches[7:]]  # crosses the revisit at step 8
    for a, b in zip(got, expected[7:]):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka

    # And back: a full-width checkpoint (from the cold start) widens a pruned module again.
    early = FiitedEmbeddingBagCollection(tables(), cfg)
    _step(early, batches[0])
    resumed.load_state_dict(_roundtrip(early.state_dict()))
    assert resumed.store.pools["shared_cs8"].stored_width == 8
    assert torch.equal(_step(resumed, batches[1]), _step(early, batches[1]))


def _trained_2d(seed=0):
    m = FiitedEmbeddingBagCollection(make_tables(), _config())
    for b in _batches(4, seed=seed):
        _step(m, b)
    return m


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd["store.dim_maps.t0.kept"].__setitem__((0, 0), 9), "outside"),
        (lambda sd: sd["store.dim_maps.t0.kept"].copy_(torch.tensor([[3, 1], [0, 2]])), "ascending"),
        (lambda sd: sd.__setitem__("store.dim_maps.t2.kept", torch.tensor([[0, 1, 2], [0, 1, 2]])),
         r"dim_maps.t2.kept.*expected \(2, 2\)"),
        (lambda sd: sd.__setitem__("store.pools.shared_cs4.weights",
                                   torch.zeros(sd["store.pools.shared_cs4.weights"].shape[0], 4)),
         r"shared_cs4.weights': expected \((\d+), 2\) torch.float32, got \(\(\1, 4\)"),
        (lambda sd: sd.__setitem__("store.dim_maps.t1.kept", torch.zeros(2, 4)), "int64"),
    ],
)
def test_corrupt_2d_checkpoint_is_rejected_and_state_unchanged(corrupt, message):
    sd = _roundtrip(_trained_2d().state_dict())
    corrupt(sd)
    m = _trained_2d(seed=1)  # other batches: a load that copied some tensors before failing shows
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        m.load_state_dict(sd)
    after = m.state_dict()
    assert set(after) == set(before) | {"_extra_state"}
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_checkpoint_without_dim_pruning_config_loads_as_off():
    cfg = FiitedConfig(num_chunks=K, budget=0.5, prune_interval=3)
    src = FiitedEmbeddingBagCollection(make_tables(), cfg)
    _step(src, _batches(1)[0])
    sd = src.state_dict()
    del sd["_extra_state"]["config"]["dim_pruning"]  # as written before FIITED-2D existed
    FiitedEmbeddingBagCollection(make_tables(), cfg).load_state_dict(sd)
    pruned = FiitedEmbeddingBagCollection(make_tables(), _config())
    with pytest.raises(ValueError, match="another FiitedConfig.*dim_pruning"):
        pruned.load_state_dict(_roundtrip(src.state_dict()))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="not supported by the sharded collection"):
        plan_pools(make_tables(), _config(), shards={t.name: TableShard(t.name) for t in make_tables()})
    off = FiitedEmbeddingBagCollection(make_tables(rows=400), FiitedConfig(num_chunks=K))
    assert len(off.store.dim_maps) == 0 and not any("dim_maps" in k for k in off.state_dict())
    with pytest.raises(ValueError, match="prune_dims needs dim_pruning.target_ratio > 0"):
        off.prune_dims()


def test_shape_like_lets_dcp_load_a_pruned_checkpoint_in_place(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    cfg = _config(optimizer="adagrad", cold_start_steps=2)
    batches = _batches(5, seed=4)
    src = FiitedEmbeddingBagCollection(make_tables(), cfg)
    for b in batches[:3]:
        _step(src, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "torch.distributed is disabled" note
        dcp.save(src.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
        dst = FiitedEmbeddingBagCollection(make_tables(), cfg)
        sizes = {k: md.size for k, md in dcp.FileSystemReader(str(tmp_path)).read_metadata()
                 .state_dict_metadata.items() if hasattr(md, "size")}
        dst.shape_like(sizes)  # DCP fills tensors in place: they need the checkpoint's shapes
        state = dst.state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    dst.load_state_dict(state)
    for b in batches[3:]:
        assert torch.equal(_step(dst, b), _step(src, b))
    with pytest.raises(ValueError, match="share one width in"):
        dst.shape_like({"store.dim_maps.t0.kept": (2, 2), "store.dim_maps.t2.kept": (2, 3)})


def test_warns_when_the_column_maps_would_take_most_of_a_small_budget():
    # 26 tables of 4000 x 16 (the hard preset's shape): at budget 0.001 the per-column maps are
    # 5,200 of 7,072 budget bytes; at 0.01 a tenth of that share, no warning.
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(num_embeddings=4000, embedding_dim=16, name=f"t{i}",
                                 feature_names=[f"f{i}"]) for i in range(26)]
    dims = DimPruningConfig(target_ratio=0.5)
    with pytest.warns(UserWarning, match=r"pool 'shared_cs8': FIITED-2D's column maps take 5,200 "
                                         r"of its 7,072 budget bytes \(74%\)"):
        FiitedEmbeddingBagCollection(tables, FiitedConfig(budget=0.001, dim_pruning=dims))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FiitedEmbeddingBagCollection(tables, FiitedConfig(budget=0.01, dim_pruning=dims))
        FiitedEmbeddingBagCollection(tables, FiitedConfig(budget=0.001))  # no dimension pruning
