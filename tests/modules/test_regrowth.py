"""Acceptance 3: a chunk evicted while cold comes back, freshly initialised, once it is hot."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

COLD_HOT = 9


def _batch(ids):
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))


def _train(m, ids, steps):
    for _ in range(steps):
        m(_batch(ids)).values().sum().backward()


def test_cold_chunk_evicted_then_reallocated_fresh():
    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=16, feature_names=["f"])
    cfg = FiitedConfig(num_chunks=2, budget=0.25, chunk_prune_ratios=[0.5, 0.5], decay=0.5,
                       enforce_ratio=0.0, prune_interval=0, optimizer="rowwise_adagrad",
                       learning_rate=0.1)
    m = FiitedEmbeddingBagCollection([table], cfg)  # 8 slots: 4 per chunk index
    et, pool = m.store.tables["t"], m.store.pool_of("t")

    _train(m, [COLD_HOT], 1)  # first touch: both chunks admitted
    assert bool((et.chunk_slots[COLD_HOT] >= 0).all())
    old_values = m.dense_weights()["t"][COLD_HOT].clone()
    _train(m, [0, 1, 2, 3], 6)  # COLD_HOT goes cold while 0..3 stay hot
    m.prune()
    assert bool((et.chunk_slots[COLD_HOT] < 0).all()), "cold chunks must be evicted"
    assert et.live_mask[COLD_HOT] == 0
    assert et.last_cycle_evictions > 0

    _train(m, [COLD_HOT], 6)  # hot again; pruned chunks still earn utility from their gradient
    assert bool((et.utilities[COLD_HOT] > 0).all())
    m.prune()
    slots = et.chunk_slots[COLD_HOT].to(torch.int64)
    assert bool((slots >= 0).all()), "the hot entry must win its slots back"
    new_values = m.dense_weights()["t"][COLD_HOT]
    low, high = table.get_weight_init_min(), table.get_weight_init_max()
    assert bool(((new_values >= low) & (new_values <= high)).all())
    assert not torch.equal(new_values, old_values)
    assert bool((pool.momentum[slots] == 0).all()), "optimizer state must be reset"
    assert m.store.invariant_errors() == []

    m.eval()
    torch.testing.assert_close(m(_batch([COLD_HOT])).values()[0], new_values)
