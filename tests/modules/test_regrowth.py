"""Acceptance 3: a chunk evicted while cold comes back, freshly initialised, once it is hot.

Store v2 has two ways back. Without a sketch (``sketch_fraction=0``) the cold row keeps its
entry with every chunk pruned, and its utility grows there. With one, the cycle erases the
entry (its utility goes to the sketch), the hot row is admitted again at its next forward, and
the cycle regrows its chunks. Both must end with the row's chunks live, re-initialised.
"""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

COLD_HOT = 9


def _batch(ids):
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))


def _train(m, ids, steps):
    """``steps`` steps on one bag per id; bag i's gradient is (i + 1) x ones, so no two of the
    ids' utilities tie at a threshold."""
    scale = torch.arange(1, len(ids) + 1, dtype=torch.float32).unsqueeze(1)
    for _ in range(steps):
        (m(_batch(ids)).values() * scale).sum().backward()


def _entry(m, row):
    """Entry int64 [1] of ``row`` of table "t" (the null entry if it has none)."""
    return m.store.entries_of("t").lookup(m.store.keys("t", torch.tensor([row])))


@pytest.mark.parametrize("sketch_fraction", [0.0, 0.05], ids=["entry_kept", "erased_and_readmitted"])
def test_cold_chunk_evicted_then_reallocated_fresh(sketch_fraction):
    table = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=24, feature_names=["f"])
    # 0.23 buys 8 slots with or without the sketch's cells (0.24 buys 9 without).
    budget = 0.23
    cfg = FiitedConfig(num_chunks=2, budget=budget, chunk_prune_ratios=[0.5, 0.5], decay=0.5,
                       enforce_ratio=0.0, prune_interval=0, optimizer="rowwise_adagrad",
                       learning_rate=0.1, sketch_fraction=sketch_fraction)
    m = FiitedEmbeddingBagCollection([table], cfg)
    et, pool, sketch = m.store.entries_of("t"), m.store.pool_of("t"), m.store.sketches["shared_cs32"]
    # 8 slots (4 per chunk index) and 8 entries: the 5 rows below always have entries.
    assert pool.capacity == 8 and et.capacity == 8
    assert (sketch.width > 0) == (sketch_fraction > 0)

    _train(m, [COLD_HOT], 1)  # first touch: both chunks admitted
    entry = _entry(m, COLD_HOT)
    assert bool((et.chunk_slots[entry] >= 0).all())
    old_values = m.dense_weights()["t"][COLD_HOT].clone()
    _train(m, [0, 1, 2, 3], 6)  # COLD_HOT goes cold while 0..3 stay hot
    m.prune()
    assert et.last_cycle_evictions > 0
    assert m.stats()["tables"]["t"]["evictions_last_cycle"] >= 2
    if sketch.width:
        # No live chunk left: the entry is erased and its utility kept in the sketch.
        assert int(_entry(m, COLD_HOT)) == et.null_entry
        assert bool((sketch.estimate(m.store.keys("t", torch.tensor([COLD_HOT]))) > 0).all())
        assert m.stats()["tables"]["t"]["erased_last_cycle"] >= 1
    else:
        assert int(_entry(m, COLD_HOT)) == int(entry)
        assert bool((et.chunk_slots[entry] < 0).all()), "cold chunks must be evicted"
    assert bool((m.dense_weights()["t"][COLD_HOT] == 0).all())
    # Whichever of rows 0..3 admission left without chunks either regrew them in the cycle or
    # (at the threshold, so neither kept nor regrown) was erased: re-admitted, it takes the free
    # slots back, so COLD_HOT's chunks can only come back through the next cycle.
    _train(m, [0, 1, 2, 3], 1)
    assert pool.free_count() == 0

    _train(m, [COLD_HOT], 6)  # hot again; pruned chunks still earn utility from their gradient
    entry = _entry(m, COLD_HOT)
    assert int(entry) != et.null_entry  # readmitted (or kept)
    assert bool((et.chunk_slots[entry] < 0).all()), "the pool was full: no slot before the cycle"
    assert bool((et.utilities[entry] > 0).all())
    m.prune()
    step = int(m.steps_done)
    slots = et.chunk_slots[entry].to(torch.int64).squeeze(0)
    assert bool((slots >= 0).all()), "the hot entry must win its slots back"
    new_values = m.dense_weights()["t"][COLD_HOT]
    # Freshly initialised: the counter-based init of (row, chunk) at the cycle's step.
    fresh = m.store.init_values("t", torch.tensor([COLD_HOT, COLD_HOT]), torch.tensor([0, 1]), step)
    assert torch.equal(new_values, fresh.reshape(-1))
    low, high = table.get_weight_init_min(), table.get_weight_init_max()
    assert bool(((new_values >= low) & (new_values <= high)).all())
    assert not torch.equal(new_values, old_values)
    assert bool((pool.momentum[slots] == 0).all()), "optimizer state must be reset"
    assert m.store.invariant_errors() == []

    m.eval()
    torch.testing.assert_close(m(_batch([COLD_HOT])).values()[0], new_values)
