"""Acceptance 6: memory really is the budget, during training, and stats() accounts for it."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

ROWS, DIM, K, TABLES, BUDGET = 100_000, 64, 4, 4, 0.25


def _module_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))


def test_quarter_budget_holds_a_quarter_plus_bounded_metadata():
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f{i}"])
        for i in range(TABLES)
    ]
    m = FiitedEmbeddingBagCollection(tables, FiitedConfig(num_chunks=K, budget=BUDGET, prune_interval=5))
    gen = torch.Generator().manual_seed(0)
    full = TABLES * ROWS * DIM * 4
    for step in range(10):  # two pruning cycles; the bound holds at every step
        ids = torch.randint(0, ROWS, (TABLES * 2048,), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(TABLES)], values=ids,
            lengths=torch.ones(TABLES * 2048, dtype=torch.int64))
        m(kjt).values().sum().backward()

        stats = m.stats()
        b = stats["bytes"]
        assert b["pools"] + b["optimizer"] + b["metadata"] == b["total"] == _module_bytes(m)
        assert stats["bytes_full"] == full
        assert b["pools"] <= BUDGET * full
        # rowwise Adagrad: one fp32 per slot, i.e. the state of every slot that can be live.
        live_slots_state = m.store.pools["shared_cs16"].capacity * 4
        assert b["optimizer"] == live_slots_state
        assert b["metadata"] <= (8 * K + 16) * TABLES * ROWS
        assert b["total"] <= BUDGET * full + live_slots_state + (8 * K + 16) * TABLES * ROWS
    assert stats["pools"]["shared_cs16"]["free_slots"] < m.store.pools["shared_cs16"].capacity
    assert sum(t["entries_seen"] for t in stats["tables"].values()) > 0
