"""Acceptance 4 (dynamic): one global threshold; occupancy per chunk follows utility."""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

ROWS, DIM, K = 64, 256, 4


def _train_skewed(mode: str):
    """Gradients are 8x larger on chunk 0 than on the others, so chunk 0 has the top utilities."""
    table = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f"])
    # entries_per_slot=4: an entry for every row (store v2), so the chunks compete by utility
    # alone; D=256 makes the entries cheap next to the chunks, so the pool has more slots than
    # rows but far fewer than K x rows. No sketch: every id has an entry, none is admitted later.
    cfg = FiitedConfig(num_chunks=K, budget=0.5, ratio_mode=mode, prune_interval=0,
                       enforce_ratio=0.0, optimizer="sgd", learning_rate=0.0, entries_per_slot=4.0,
                       sketch_fraction=0.0)
    m = FiitedEmbeddingBagCollection([table], cfg)
    scale = torch.ones(DIM)
    scale[: DIM // K] = 8.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randperm(ROWS, generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids,
                                                  lengths=torch.ones(ROWS, dtype=torch.int64))
        (m(kjt).values() * scale * torch.rand(ROWS, 1, generator=gen)).sum().backward()
    assert m.stats()["tables"]["t"]["entries_seen"] == ROWS
    assert ROWS < m.store.pool_of("t").capacity < ROWS * K / 2
    decisions = m.prune()
    return m, decisions[next(iter(decisions))]


def test_dynamic_uses_one_global_threshold_and_follows_utility():
    m, decision = _train_skewed("dynamic")
    thresholds = decision["thresholds"]
    assert len(set(thresholds)) == 1
    live = m.stats()["tables"]["t"]["live_chunks"]
    # Chunk 0 dominates the utilities, so it keeps every row; the other chunks share the rest.
    assert live[0] == ROWS
    assert live[0] > max(live[1:])
    assert sum(live) <= m.store.pool_of("t").capacity


def test_manual_keeps_per_chunk_ratios_regardless_of_utility():
    m, decision = _train_skewed("manual")
    assert len(set(decision["thresholds"])) > 1
    live = m.stats()["tables"]["t"]["live_chunks"]
    ratios = m.stats()["pools"]["shared_cs64"]["target_chunk_prune_ratios"]
    expected = [round(ROWS * (1 - r)) for r in ratios]
    assert all(abs(a - b) <= 1 for a, b in zip(live, expected)), (live, expected)
