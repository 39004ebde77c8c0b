"""Eval is read-only, hash_ids, K=1 row pruning, automatic cycles, fused optimizer integration."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
import torchrec_fiited
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection


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
    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])
    m = FiitedEmbeddingBagCollection([table], FiitedConfig(num_chunks=1, budget=1.0, hash_ids=True))
    ids = torch.tensor([-5, 2**62, 123456789, -5])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.ones(4, dtype=torch.int64))
    m(kjt).values().sum().backward()
    m.eval()
    out = m(kjt).values()
    assert torch.equal(out[0], out[3])  # the same id maps to the same entry
    assert int(m.store.tables["t"].num_seen) == 3
    assert out.abs().sum() > 0


def test_k1_is_row_pruning(gen):
    """K=1 (AdaEmbed): a row is live or pruned as a whole."""
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(num_chunks=1, budget=0.3, prune_interval=2,
                                                                 enforce_ratio=0.0))
    for _ in range(6):
        m(random_kjt(make_tables(), 8, gen)).values().pow(2).sum().backward()
    assert m.stats()["pools"]["shared_cs8"]["last_cycle"]["step"] == 6
    for name, et in m.store.tables.items():
        assert et.chunk_slots.shape[1] == 1
        dense = m.dense_weights()[name]
        pruned_rows = et.chunk_slots[:, 0] < 0
        assert bool((dense[pruned_rows] == 0).all())
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


def _two_tables():
    return [
        EmbeddingBagConfig(name="hot", embedding_dim=8, num_embeddings=50, feature_names=["h"]),
        EmbeddingBagConfig(name="cold", embedding_dim=8, num_embeddings=50, feature_names=["c"]),
    ]


def _train_hot_cold(m, steps=4):
    """Table "hot" gets gradients 20x larger than table "cold" on the same number of rows."""
    ids = torch.arange(50)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["h", "c"], values=torch.cat([ids, ids]), lengths=torch.ones(100, dtype=torch.int64))
    scale = torch.cat([torch.full((8,), 20.0), torch.ones(8)])
    for _ in range(steps):
        (m(kjt).values() * scale).sum().backward()


def test_tables_compete_for_the_shared_pool_by_utility():
    cfg = FiitedConfig(num_chunks=2, budget=0.5, prune_interval=0, enforce_ratio=0.0,
                       optimizer="sgd", learning_rate=0.0)
    m = FiitedEmbeddingBagCollection(_two_tables(), cfg)
    _train_hot_cold(m)
    m.prune()
    live = {t: s["live_chunks"] for t, s in m.stats()["tables"].items()}
    assert m.stats()["pools"].keys() == {"shared_cs4"}
    # 100 slots; manual ratios at budget 0.5 are [0.25, 0.75], so chunk 0 gets 75 slots and
    # chunk 1 gets 25. Within each chunk index the hot table wins every slot it can use.
    assert live == {"hot": [50, 25], "cold": [25, 0]}, live


def test_table_budget_override_gets_its_own_pool():
    cfg = FiitedConfig(num_chunks=2, budget=0.5, table_budgets={"cold": 0.2}, prune_interval=0,
                       enforce_ratio=0.0, optimizer="sgd", learning_rate=0.0)
    m = FiitedEmbeddingBagCollection(_two_tables(), cfg)
    assert m.store.pools["own_cold"].capacity == 20  # 0.2 * 50 rows * 8 dims / 4 floats per chunk
    assert m.store.pools["shared_cs4"].capacity == 50
    _train_hot_cold(m)
    m.prune()
    live = {t: sum(s["live_chunks"]) for t, s in m.stats()["tables"].items()}
    # Cold can no longer be starved by hot: it fills its own pool; hot keeps its share.
    assert live == {"hot": 50, "cold": 20}, live
