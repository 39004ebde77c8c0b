"""DistributedModelParallel with the FIITED sharder, 2 gloo ranks on CPU, against one process.

TorchRec divides embedding gradients by the world size in backward and DDP averages the dense
ones, so a DLRM trained on 2 ranks with a per-rank mean loss follows the single-process run on
the concatenated global batches, step for step.
"""

import pytest
import torch

from tests.distributed import cases
from tests.distributed.harness import run_ranks
from torchrec_fiited.store import row_permutation
from torchrec_fiited.store.sizing import full_table_bytes

STEPS = 6
# Own pools per table at budget 0.5: table-wise shards hold whole pools, so the budget binds,
# cycles evict and regrow, and the run must still equal the single-process one exactly.
BINDING = dict(
    num_chunks=4, budget=0.5, table_budgets={"t0": 0.5, "t1": 0.5, "t2": 0.5}, prune_interval=2,
    warmup_steps=0, sample_size=20, enforce_ratio=0.0, learning_rate=0.1,
)
# The same with the hashed fallback: ids without an entry read and train a shared hashed row.
HASHED = dict(BINDING, miss="hashed")
# Row- and column-wise shards have pools of their own, so where a full pool turns chunks away
# (or a full hash bucket turns a row away) depends on the plan. With the paper's fixed ratios at
# budget 1.0 on tables of 64x the rows the batches touch (cases.ROOMY_STRIDE), no pool and no
# bucket fills, yet every cycle prunes (1 - p_k) of chunk k by thresholds from the all-gathered
# samples. No sketch: a column shard erases a row that holds no chunk *of its own*, where one
# process keeps it while another chunk is live, so with a sketch their utilities part ways
# (issue 13 redoes sharding on store v2).
ROOMY = dict(
    BINDING, budget=1.0, table_budgets={}, ratio_target="ratios",
    chunk_prune_ratios=[0.25, 0.5, 0.75, 0.5], sketch_fraction=0.0,
)
# Row-wise shards hold whole rows, so they erase (and readmit through their sketch) exactly the
# rows one process does; their sketches are narrower, but wide enough not to collide here.
ROOMY_SKETCH = dict(ROOMY, sketch_fraction=0.5)


def _decisions(last_cycle):
    """What the ranks decide together, per logical pool (``tables``: each rank's own counts)."""
    return {pool: {k: v for k, v in d.items() if k != "tables"} for pool, d in last_cycle.items()}


def _check_matches(res, ref):
    for step in range(STEPS):
        got = torch.cat([r["logits"][step] for r in res])
        torch.testing.assert_close(got, ref["logits"][step], rtol=1e-5, atol=1e-6)
        # The global loss is the mean of the ranks' mean losses (equal batch slices).
        assert sum(r["losses"][step] for r in res) / len(res) == pytest.approx(ref["losses"][step], abs=1e-6)
    for key, want in ref["state"].items():
        if key == "steps_done":
            continue
        torch.testing.assert_close(res[0]["state"][key].to(want.dtype), want, rtol=1e-5, atol=1e-6)
    # Every rank decided exactly what the others did, and what one process decides.
    assert _decisions(res[0]["last_cycle"]) == _decisions(res[1]["last_cycle"])
    for pool, mine in ref["last_cycle"].items():
        theirs = res[0]["last_cycle"][pool]
        assert theirs["enforced"] == mine["enforced"] and theirs["num_seen"] == mine["num_seen"]
        assert theirs["num_sampled"] == mine["num_sampled"]
        assert theirs["thresholds"] == pytest.approx(mine["thresholds"], rel=1e-5)


@pytest.mark.parametrize(
    "sharding_type,config,stride",
    [
        ("table_wise", BINDING, 1),
        ("table_wise", HASHED, 1),
        ("row_wise", ROOMY, cases.ROOMY_STRIDE),
        ("row_wise", ROOMY_SKETCH, cases.ROOMY_STRIDE),
        ("column_wise", ROOMY, cases.ROOMY_STRIDE),
    ],
)
def test_dlrm_on_two_ranks_matches_single_process(sharding_type, config, stride):
    res = run_ranks(cases.dlrm_steps, 2, sharding_type, config, STEPS, False, stride)
    ref = cases.dlrm_single(config, STEPS, stride)
    assert set(res[0]["plan"].values()) == {sharding_type}
    if sharding_type != "table_wise":  # every table really split over the two ranks
        assert set(res[0]["num_shards"].values()) == {2}
    _check_matches(res, ref)
    if config.get("miss") == "hashed":  # the fallbacks trained, as in one process
        fresh = cases.dlrm_single(config, 0, stride)["fallbacks"]
        got = {t: w for r in res for t, w in r["fallbacks"].items()}
        assert got.keys() == ref["fallbacks"].keys() == {"t0", "t1", "t2"}
        for t, want in ref["fallbacks"].items():
            torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-6)
            assert not torch.equal(want, fresh[t]), t
    # Chunks were really pruned on the way.
    live = sum(int(v.sum()) for k, v in ref["state"].items() if k.endswith("fiited_live"))
    resident = sum(v.numel() * 4 for k, v in ref["state"].items() if k.endswith("fiited_rows"))
    assert 0 < live < 0.8 * resident
    if config is BINDING:  # pools so small that rows were displaced or erased on the way
        assert resident < 0.5 * 4 * (64 + 48 + 40)
    if config is ROOMY_SKETCH:  # rows were erased into the sketch (every touched row is admitted,
        assert ref["sketch_mass"] > 0  # so only erased rows' utilities reach it)


def test_train_pipeline_sparse_dist_pipelines_and_matches():
    res = run_ranks(cases.dlrm_steps, 2, "table_wise", BINDING, STEPS, True)
    assert all(r["pipelined"] == ["ShardedFiitedEmbeddingBagCollection"] for r in res)
    _check_matches(res, cases.dlrm_single(BINDING, STEPS))


def test_row_wise_shards_hold_the_hash_ranges_of_their_ids():
    # Ids skewed to the low rows (rand ** 2, as the batches): a block split of [0, E) would send
    # rank 0 about 70% of the lookups; hash ranges about half.
    E = 100_000
    ids = (torch.rand(200_000, generator=torch.Generator().manual_seed(0)) ** 2 * E).long()
    assert float((ids < E // 2).float().mean()) > 0.7
    assert 0.49 < float((row_permutation(ids, E) < E // 2).float().mean()) < 0.51
    # Each rank holds exactly the rows of its range, keyed by the ids themselves, none twice.
    res = run_ranks(cases.dlrm_steps, 2, "row_wise", ROOMY, STEPS, False, cases.ROOMY_STRIDE)
    for t in cases.tables(cases.ROOMY_STRIDE):
        block = t.num_embeddings // 2
        rows = [r["resident_rows"][t.name] for r in res]
        both = torch.cat(rows)
        assert both.unique().numel() == both.numel() and all(r.numel() for r in rows)
        for rank, mine in enumerate(rows):
            hashed = row_permutation(mine, t.num_embeddings)
            assert bool(((hashed >= rank * block) & (hashed < (rank + 1) * block)).all())


@pytest.mark.parametrize("sharding_type", ["row_wise", "column_wise"])
def test_each_rank_pool_within_its_budget_and_same_thresholds(sharding_type):
    # 0.15: binding for every chunk index (at 0.25 the row shards' pools, since session 9's
    # smaller entries, keep chunks 0 and 1 whole: threshold 0 is then right).
    budget = 0.15
    config = dict(BINDING, budget=budget, table_budgets={})
    # 8x the rows: a quarter of 32 rows' bytes cannot hold a bucket of entries and a slot.
    res = run_ranks(cases.dlrm_steps, 2, sharding_type, config, STEPS, False, 8)
    # The ranks decide from the plan's resident rows and slots, as one process does from its
    # own: real thresholds (a column shard once compared the whole pool's slots with its own
    # rows, kept every chunk at threshold 0 and never evicted again).
    ref = cases.dlrm_single(config, STEPS, 8)["last_cycle"]
    for pool, mine in res[0]["last_cycle"].items():
        assert all(t > 0 for t in mine["thresholds"]), mine
        if sharding_type == "row_wise":  # column shards spend bytes on entries per shard
            assert 0.5 < mine["num_seen"] / ref[pool]["num_seen"] <= 1.5
    for r in res:
        budget_bytes = budget * r["local_full_bytes"]
        if sharding_type == "column_wise":
            # Chunk ranges get the budget weighted by what the pool keeps of them: rank 0's
            # first chunks more than 0.25 of their bytes, the last chunks less; the two
            # ranks together within the collection's budget.
            continue
        # Each rank's one pool (chunks of 2 floats) holds every byte of its lookup (chunks,
        # optimizer state, entries, sketch, counters) within the budget of its rows' full bytes (fp32
        # weights + rowwise Adagrad state): under a slot (14 B: int16 slot indices) short at
        # most, never over.
        assert r["slot_bytes"] == [14]
        assert budget_bytes - 14 < r["local_bytes"] <= budget_bytes
    if sharding_type == "column_wise":
        # Against the collection's full bytes: a column shard's share of the rowwise Adagrad
        # state is its share of the columns (not one state per shard).
        full = sum(full_table_bytes(t.num_embeddings, t.embedding_dim, "rowwise_adagrad")
                   for t in cases.tables(8))
        total = sum(r["local_bytes"] for r in res)
        assert 0.8 * budget * full < total <= budget * full, (total, full)
    assert _decisions(res[0]["last_cycle"]) == _decisions(res[1]["last_cycle"])
    assert res[0]["last_cycle"]


@pytest.mark.parametrize("kind,stride", [("table_wise", 1), ("row_wise", 4), ("column_wise", 4)])
def test_dcp_checkpoint_resumes_bitwise_in_the_same_plan(kind, stride, tmp_path):
    """Save after 3 steps and train 4 more, against a fresh collection that loads the checkpoint
    and trains the same 4: equal bit for bit (outputs and every tensor of the state), with pools
    small enough that rows are displaced and erased on the way. (4x the rows for row and column
    shards: a half of the 64-row tables at budget 0.5 cannot hold a bucket of entries.)"""
    res = run_ranks(cases.dcp_resume, 2, kind, BINDING, str(tmp_path / "ckpt"), stride)
    for r in res:
        assert r["whole"]["steps"] == r["resumed"]["steps"] == 7
        torch.testing.assert_close(r["resumed"]["outputs"], r["whole"]["outputs"], rtol=0, atol=0)
        assert r["resumed"]["own"].keys() == r["whole"]["own"].keys()
        for key, want in r["whole"]["own"].items():
            assert torch.equal(r["resumed"]["own"][key], want), key
        # The state is sparse: no tensor of it is as large as a dense table of the shard.
        assert max(r["saved_numels"].values()) < 40 * 8 * stride
    whole, resumed = res[0]["whole"]["state"], res[0]["resumed"]["state"]
    assert whole.keys() == resumed.keys() and any(k.endswith("fiited_rows") for k in whole)
    for key, want in whole.items():
        torch.testing.assert_close(resumed[key], want, rtol=0, atol=0)


def test_dcp_save_at_two_ranks_load_at_one_with_the_same_shards(tmp_path):
    # Table-wise with a pool per table: at one rank every table is the same shard in a pool of
    # the same size, so the checkpoint loads (rows back to their entries, sketches and all).
    path = str(tmp_path / "ckpt")
    saved = run_ranks(cases.dcp_save, 2, "table_wise", BINDING, path)[0]
    at_one = run_ranks(cases.dcp_load, 1, "table_wise", BINDING, path)[0]
    assert saved.abs().sum() > 0
    torch.testing.assert_close(at_one, saved, rtol=0, atol=0)


FIXED = dict(BINDING, ratio_target="ratios", chunk_prune_ratios=[0.25, 0.5, 0.75, 0.5])


@pytest.mark.parametrize("saved_as, loads", [
    ("row_wise", [(1, "table_wise"), (4, "row_wise")]),
    ("table_wise", [(4, "row_wise"), (2, "column_wise")]),  # table-wise at 1 and 4: below
    ("column_wise", [(1, "table_wise"), (4, "row_wise")]),
])
def test_dcp_save_at_two_ranks_loads_at_one_and_four_under_any_plan(saved_as, loads, tmp_path):
    # Budget-bound tables (pruned chunks, evictions) with room for their rows under every plan.
    path, S = str(tmp_path / "ckpt"), cases.ROOMY_STRIDE
    saved = run_ranks(cases.dcp_save, 2, saved_as, BINDING, path, S)[0]
    assert saved.abs().sum() > 0
    for world_size, kind in loads:
        # Column shards' pools get the budget weighted by what the pool keeps of their chunks:
        # with budget-target ratios fewer slots than these rows' live chunks; with fixed ratios
        # each gets its budget.
        config = FIXED if kind == "column_wise" else BINDING
        got = run_ranks(cases.dcp_load_resharded, world_size, kind, config, path, S)[0]
        # Row-wise bags are sums of per-rank partial bags: equal up to fp32 summation order.
        torch.testing.assert_close(got, saved, rtol=1e-6, atol=1e-7, msg=f"{world_size} {kind}")


def test_hashed_fallbacks_reshard_bucket_by_bucket(tmp_path):
    # Row-wise at 2 ranks under a binding budget, every table's hashed fallback split over the
    # ranks (the bucket at the boundary on both, trained as one), loaded whole at 1 and at 4
    # ranks: every fallback comes back and every id reads what it read when saved. (Split into
    # other splits: test_reshard_fallback.py; binding pools at 4 ranks would not fit here.)
    # A few wide buckets, so both ranks' ids train the boundary bucket at every step. Stride 6:
    # the one-rank pools hold every row the two shards hold (at 8 the 2-rank shards' pools,
    # sized apart, together hold 181 live chunks of t0 against the whole pool's 150 slots).
    config, path, S = dict(HASHED, fallback_fraction=0.01), str(tmp_path / "ckpt"), 6
    saved = run_ranks(cases.dcp_save, 2, "row_wise", config, path, S)[0]
    for world_size in (1, 4):
        got = run_ranks(cases.dcp_load_resharded_fallbacks, world_size, "table_wise", config, path, S)
        assert all(r["restarted"] == [] for r in got)
        assert sum(len(r["loaded"]) for r in got) == 3  # every table's fallback
        assert any(any(r["loaded"].values()) for r in got)  # trained ones came back
        # Row-wise bags were sums of per-rank partial bags: equal up to fp32 summation order.
        torch.testing.assert_close(got[0]["outputs"], saved, rtol=1e-6, atol=1e-7,
                                   msg=f"{world_size} ranks")


def test_a_resharded_load_that_does_not_fit_refuses_on_every_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    roomier = dict(BINDING, table_budgets={"t0": 1.0, "t1": 1.0, "t2": 1.0})
    run_ranks(cases.dcp_save, 2, "row_wise", roomier, path)
    # Two ranks' pools at budget 1.0 into one table-wise rank's pools at 0.5: no room.
    for got in run_ranks(cases.dcp_load_resharded_errors, 2, "table_wise", BINDING, path):
        assert "cannot load the FIITED checkpoint" in got and "pool 'own_t0'" in got, got
        assert "rank 0:" in got and got.endswith("unchanged=True"), got


@pytest.mark.parametrize("config,stride", [
    # The unsharded pools must hold every row the shards hold: tables with room for every
    # touched row (the shards' pools, sized separately, could together hold more).
    (BINDING, cases.ROOMY_STRIDE),
    # Trained hashed fallbacks split over the ranks (wide buckets: both train the boundary one)
    # come along bucket by bucket.
    (dict(HASHED, fallback_fraction=0.01), 6),
])
def test_export_of_a_sharded_model_through_a_plan_independent_gather(config, stride):
    sharded_out, exported_out = run_ranks(cases.export_sharded, 2, "row_wise", config, stride)[0]
    assert sharded_out.abs().sum() > 0
    # Row-wise outputs are sums of per-rank partial bags: equal up to fp32 summation order.
    torch.testing.assert_close(exported_out, sharded_out, rtol=1e-6, atol=1e-7)


def test_bad_batches_fail_before_routing_and_leave_the_state():
    errors = run_ranks(cases.bad_inputs, 2)[0]
    assert "feature 'f3'" in errors[0] and "999" in errors[0], errors[0]
    assert "feature 'f0'" in errors[1] and "-1" in errors[1], errors[1]
    assert "lacks the collection's features: missing ['f3']" in errors[2] and "nope" in errors[2]
    assert errors[3] == "steps_done=0"


def test_dmp_collects_the_fused_optimizer_and_its_lr_reaches_every_shard():
    got = run_ranks(cases.fused_optimizer_drives_lookups, 2)
    # Same keys and state on every rank, so DCP can store the optimizer once; the per-chunk
    # optimizer state is sharded with the rows in the module's state_dict instead.
    assert got[0]["keys"] == got[1]["keys"] and got[0]["state"] == got[1]["state"] == {"state": {}}
    assert {k.split(".")[-2] for k in got[0]["keys"]} == {"t0", "t1", "t2"}
    assert got[0]["same_rows"] is True and got[0]["live_values"] > 0
    assert got[0]["moved"] is True and got[0]["frozen"] is True


def test_single_process_state_loads_into_a_sharded_collection():
    # From one process (pools full, chunks pruned) to 2 ranks: the plan-independent form holds
    # each table's resident rows and each rank takes its rows or columns. The shards' own pools
    # need the room for their rows and live chunks (a full pool's mix does not follow a per-rank
    # split), hence the larger budget; table-wise keeps whole pools and loads at the same budget.
    roomier = dict(BINDING, table_budgets={"t0": 1.0, "t1": 1.0, "t2": 1.0})
    # Under budget-target ratios a column shard's pool gets the water-filled share of the logical
    # pool's slots, which store v2's metadata makes a small share (issue 13 redoes that sizing);
    # with the paper's fixed ratios each shard's pool gets its budget.
    fixed = dict(roomier, ratio_target="ratios", chunk_prune_ratios=[0.25, 0.5, 0.75, 0.5])
    # The source at 0.35: at 0.5 it holds 30 live chunks of t0, more than the two column shards'
    # pools (11 slots each at 1.0: each keeps entries and a sketch for all its rows) can take.
    source = dict(BINDING, budget=0.35, table_budgets={"t0": 0.35, "t1": 0.35, "t2": 0.35})
    loads = (("table_wise", source), ("column_wise", fixed), ("row_wise", roomier))
    for kind, load_config in loads:
        want, got = run_ranks(cases.load_single_process_state, 2, kind, source, load_config)[0]
        # Row-wise bags are summed per rank: equal up to fp32 summation order.
        tol = dict(rtol=1e-6, atol=1e-7) if kind == "row_wise" else dict(rtol=0, atol=0)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_sharded_lookups_reuse_their_step_buffers(kind):
    for got in run_ranks(cases.sharded_buffer_reuse, 2, kind):
        assert got["equal"]  # bitwise what fresh tensors every step give
        assert all(b > 0 for step in got["free_bytes"] for b in step)  # released after backward
        n = got["num_lookups"]
        first, second = got["keys_ptrs"][:n], got["keys_ptrs"][n:]
        assert len(first) == len(second) == n
        # The next step's keys reuse a buffer the last step released (which one depends on the
        # sizes: a row shard's batch size varies from step to step).
        assert all(set(a) & set(b) for a, b in zip(first, second))
        assert "backward ran twice" in got["refused"]
