"""Eval is read-only, hash_ids, K=1 row pruning, automatic cycles, fused optimizer integration."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
import torchrec_fiited
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.store import key_row
from torchrec_fiited.store.sizing import TableSpec, full_table_bytes, pool_bytes


def test_eval_mode_only_reads(gen):
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=0.5, prune_interval=1))
    m(random_kjt(make_tables(), 4, gen)).values().sum().backward()
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    out = m(random_kjt(make_tables(), 8, gen, max_len=8))
    assert not out.values().requires_grad
    after = m.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_hash_ids_accepts_any_int64_and_is_deterministic():
    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=1000, feature_names=["f"])
    m = FiitedEmbeddingBagCollection([table], FiitedConfig(num_chunks=1, budget=1.0, hash_ids=True))
    ids = torch.tensor([-5, 2**62, 123456789, -5])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.ones(4, dtype=torch.int64))
    m(kjt).values().sum().backward()
    m.eval()
    out = m(kjt).values()
    assert torch.equal(out[0], out[3])  # the same id maps to the same entry
    assert m.stats()["tables"]["t"]["entries_seen"] == int(m.store.entries_of("t").num_seen) == 3
    assert bool((out.abs().sum(1) > 0).all())  # every id got an entry with a live chunk


def test_k1_is_row_pruning(gen):
    """K=1 (AdaEmbed): a row is live or pruned as a whole."""
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(num_chunks=1, budget=0.3, prune_interval=2,
                                                                 enforce_ratio=0.0))
    for _ in range(6):
        m(random_kjt(make_tables(), 8, gen)).values().pow(2).sum().backward()
    assert m.stats()["pools"]["shared_cs8"]["last_cycle"]["step"] == 6
    dense = m.dense_weights()
    pruned = 0
    for name in m.store.layouts:
        et = m.store.entries_of(name)
        assert et.chunk_slots.shape[1] == 1
        entries = m.store.table_entries(name)
        rows = key_row(et.keys_of(entries))
        live = et.chunk_slots[entries, 0] >= 0
        pruned += int((~live).sum())
        # A row reads its whole chunk or nothing: non-zero rows are exactly the live entries.
        nonzero = (dense[name] != 0).any(1)
        assert bool((dense[name][nonzero] != 0).all())
        assert sorted(nonzero.nonzero().squeeze(1).tolist()) == sorted(rows[live].tolist())
    stats = m.stats()
    # The cycle did prune rows (evicted, or erased with their entry), so the check above bites.
    evicted = sum(t["evictions_last_cycle"] + t["erased_last_cycle"] for t in stats["tables"].values())
    assert pruned + evicted > 0
    assert m.store.invariant_errors() == []


def test_cycles_run_every_prune_interval_steps(gen):
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=0.3, prune_interval=4, warmup_steps=8))
    steps_with_cycle = []
    for step in range(1, 17):
        m(random_kjt(make_tables(), 4, gen)).values().sum().backward()
        last = m.stats()["pools"]["shared_cs4"]["last_cycle"]
        if last and last["step"] == step:
            steps_with_cycle.append(step)
    assert steps_with_cycle == [8, 12, 16]


def test_fused_optimizer_is_a_keyed_optimizer_driving_the_lr(gen):
    tables = make_tables()
    m = FiitedEmbeddingBagCollection(tables, FiitedConfig(budget=1.0, optimizer="sgd", learning_rate=0.5,
                                                          prune_interval=0))
    dense = torch.nn.Linear(2, 1)
    combined = CombinedOptimizer([
        ("sparse", m.fused_optimizer),
        ("dense", KeyedOptimizerWrapper(dict(dense.named_parameters()), lambda p: torch.optim.SGD(p, lr=0.1))),
    ])
    assert "sparse.pools.shared_cs4.weights" in combined.params
    sched = torch.optim.lr_scheduler.LambdaLR(m.fused_optimizer, lambda epoch: 0.0)
    kjt = random_kjt(tables, 4, gen)
    m(kjt).values().sum().backward()  # trains the admitted chunks once
    m.fused_optimizer.step()
    sched.step()  # lr -> 0: the next backward must leave the weights alone
    assert m.fused_optimizer.param_groups[0]["lr"] == 0.0
    before = m.dense_weights()
    m(kjt).values().sum().backward()
    after = m.dense_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_public_classes_are_documented():
    for obj in (torchrec_fiited.FiitedConfig, torchrec_fiited.FiitedEmbeddingBagCollection,
                torchrec_fiited.store.VHPIStore, torchrec_fiited.store.ChunkPool,
                torchrec_fiited.store.EntryTable, torchrec_fiited.policy.ManualRatioPolicy,
                torchrec_fiited.policy.DynamicThresholdPolicy, torchrec_fiited.optim.FiitedFusedOptimizer):
        assert obj.__doc__ and not obj.__doc__.startswith(obj.__name__ + "("), obj


def test_itep_schedule_is_front_loaded(gen):
    cfg = FiitedConfig(budget=0.3, prune_interval=40, schedule="itep")
    m = FiitedEmbeddingBagCollection(make_tables(), cfg)
    steps_with_cycle = []
    for step in range(1, 81):
        m(random_kjt(make_tables(), 2, gen)).values().sum().backward()
        last = m.stats()["pools"]["shared_cs4"]["last_cycle"]
        if last and last["step"] == step:
            steps_with_cycle.append(step)
    assert steps_with_cycle == [3, 6, 9, 30, 40, 60, 80]


HOT, COLD, DIM = 100, 300, 64


def _two_tables(hot_rows=HOT):
    return [
        EmbeddingBagConfig(name="hot", embedding_dim=DIM, num_embeddings=hot_rows, feature_names=["h"]),
        EmbeddingBagConfig(name="cold", embedding_dim=DIM, num_embeddings=COLD, feature_names=["c"]),
    ]


def _hot_cold_kjt(hot_rows: int, hot: bool = True):
    """Every row of "cold" once (one id per bag), and every row of "hot" (or none)."""
    hot_ids = torch.arange(hot_rows) if hot else torch.zeros(0, dtype=torch.int64)
    hot_lengths = torch.zeros(COLD, dtype=torch.int64)
    hot_lengths[: hot_ids.numel()] = 1
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["h", "c"], values=torch.cat([hot_ids, torch.arange(COLD)]),
        lengths=torch.cat([hot_lengths, torch.ones(COLD, dtype=torch.int64)]))


def _train_hot_cold(m, steps=4, all_resident=True):
    """Cold's rows are admitted first and take the free slots; then table "hot" gets gradients
    ~20x larger than table "cold" (random per row and column, so no utilities tie)."""
    gen = torch.Generator().manual_seed(0)
    hot_rows = m.embedding_bag_configs()[0].num_embeddings
    m(_hot_cold_kjt(hot_rows, hot=False)).values().sum().backward()
    for _ in range(steps):
        out = m(_hot_cold_kjt(hot_rows)).values()
        scale = torch.rand(COLD, 2 * DIM, generator=gen) + 0.5
        scale[:, :DIM] *= 20.0
        (out * scale).sum().backward()
    if all_resident:  # entries for every row of both tables: the slots are what they compete for
        assert {t: s["entries_seen"] for t, s in m.stats()["tables"].items()} == {"hot": hot_rows, "cold": COLD}


def _live(m):
    return {t: s["live_chunks"] for t, s in m.stats()["tables"].items()}


# entries_per_slot=4: the hash table holds every row, so residency plays no part.
_CFG = dict(num_chunks=2, budget=0.5, prune_interval=0, enforce_ratio=0.0, optimizer="sgd",
            learning_rate=0.0, entries_per_slot=4.0)


def test_tables_compete_for_the_shared_pool_by_utility():
    m = FiitedEmbeddingBagCollection(_two_tables(), FiitedConfig(**_CFG))
    assert m.stats()["pools"].keys() == {"shared_cs32"}
    _train_hot_cold(m)
    before = _live(m)
    assert before["hot"] == [0, 0]  # cold was admitted first and holds every slot
    m.prune()
    live = _live(m)
    pool = m.stats()["pools"]["shared_cs32"]
    assert pool["free_slots"] <= 2  # the cycle refills what it evicts (quantile rounding aside)
    # Within each chunk index the hot table wins every slot it can use: all of chunk 1's few
    # slots, and chunk 0 of every hot row; cold keeps only the chunk-0 slots hot cannot use.
    total = [h + c for h, c in zip(live["hot"], live["cold"])]
    assert total[1] < HOT < total[0], total
    assert live["hot"] == [HOT, total[1]], live
    assert live["cold"] == [total[0] - HOT, 0], live


def test_table_budget_override_gets_its_own_pool():
    # As many hot rows as cold ones: in a shared pool hot uses every slot and cold starves.
    shared = FiitedEmbeddingBagCollection(_two_tables(COLD), FiitedConfig(**_CFG))
    _train_hot_cold(shared)
    shared.prune()
    assert _live(shared)["cold"] == [0, 0]
    m = FiitedEmbeddingBagCollection(_two_tables(COLD), FiitedConfig(**_CFG, table_budgets={"cold": 0.2}))
    sizes = m.store.sizes
    tables = {t.name: t for t in _two_tables(COLD)}
    for pool, budget in (("own_cold", 0.2), ("shared_cs32", 0.5)):
        specs = [TableSpec(n, tables[n].num_embeddings, DIM) for n in m.store.tables_of_pool(pool)]
        full = sum(full_table_bytes(s.num_rows, DIM, "sgd") for s in specs)
        assert pool_bytes(sizes[pool], specs, 2, "sgd")["total"] <= budget * full
    assert m.store.tables_of_pool("own_cold") == ["cold"]
    assert m.store.tables_of_pool("shared_cs32") == ["hot"]
    _train_hot_cold(m, all_resident=False)  # own_cold cannot hold an entry for every cold row
    m.prune()
    live = {t: sum(s) for t, s in _live(m).items()}
    stats = m.stats()["pools"]
    # Cold can no longer be starved by hot: it fills its own pool; hot keeps its share.
    for pool, table in (("own_cold", "cold"), ("shared_cs32", "hot")):
        assert stats[pool]["capacity"] - 2 <= live[table] <= stats[pool]["capacity"], (live, stats)
