"""Enforced pruning: eviction runs only when more than ``enforce_ratio`` of the sampled chunks sit
on the wrong side of their thresholds; allocation of pruned chunks above them runs either way."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

ROWS = 100


def _pool_with_wrong_chunks(j: int, enforce_ratio: float) -> FiitedEmbeddingBagCollection:
    """100 rows, K=2, the paper's fixed ratios (0.5, 0.5), budget 1 (the pool never binds).

    Both chunks of row e have utility e, so each threshold is the sampled median, 50 (every row
    is sampled: sample_size >= rows). Chunk 0 is live exactly for rows 50..99 (all on the right
    side). Chunk 1 has 2j chunks on the wrong side: rows 0..j-1 live below the threshold, rows
    100-j..99 pruned above it; so the churn is 2j of 200 sampled chunks.
    """
    table = EmbeddingBagConfig(name="t", num_embeddings=ROWS, embedding_dim=2, feature_names=["f"])
    cfg = FiitedConfig(num_chunks=2, budget=1.0, chunk_prune_ratios=[0.5, 0.5], ratio_target="ratios",
                       enforce_ratio=enforce_ratio, sample_size=1000, prune_interval=0, decay=1.0)
    m = FiitedEmbeddingBagCollection([table], cfg)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(ROWS), torch.ones(ROWS, dtype=torch.int64))
    m(kjt).values().sum().backward()  # every row seen, both chunks admitted
    et = m.store.tables["t"]
    assert bool((et.chunk_slots >= 0).all())
    et.utilities.copy_(torch.arange(ROWS, dtype=torch.float32).unsqueeze(1).expand(ROWS, 2))
    et.last_step.fill_(int(m.steps_done))
    rows = torch.arange(ROWS)
    m.store.evict("t", rows[:50], torch.zeros(50, dtype=torch.int64))
    pruned_1 = torch.cat([rows[j:50], rows[ROWS - j :]])
    m.store.evict("t", pruned_1, torch.ones_like(pruned_1))
    return m


def _live_rows(m, chunk: int):
    return (m.store.tables["t"].chunk_slots[:, chunk] >= 0).nonzero().squeeze(1).tolist()


# (enforce_ratio, j): churn = j / 100 at or below the ratio, the last one exactly at it.
@pytest.mark.parametrize("enforce_ratio,j", [(0.055, 0), (0.055, 5), (0.05, 5)])
def test_no_eviction_while_churn_stays_at_or_below_enforce_ratio(enforce_ratio, j):
    m = _pool_with_wrong_chunks(j, enforce_ratio)
    report = m.prune()["shared_cs1"]
    assert report["thresholds"] == [50.0, 50.0]
    assert report["churn"] == 2 * j / 200
    assert not report["enforced"]
    s = m.stats()["tables"]["t"]
    assert s["evictions_last_cycle"] == 0 and s["allocations_last_cycle"] == j
    # The wrong live chunks stay; the pruned ones above the threshold come back (slots are free).
    assert _live_rows(m, 1) == list(range(j)) + list(range(50, ROWS))
    assert _live_rows(m, 0) == list(range(50, ROWS))


@pytest.mark.parametrize("enforce_ratio,j", [(0.055, 6), (0.055, 20), (0.045, 5)])
def test_eviction_once_churn_exceeds_enforce_ratio(enforce_ratio, j):
    m = _pool_with_wrong_chunks(j, enforce_ratio)
    report = m.prune()["shared_cs1"]
    assert report["thresholds"] == [50.0, 50.0]
    assert report["churn"] == 2 * j / 200
    assert report["enforced"]
    s = m.stats()["tables"]["t"]
    # Exactly the live chunks below the threshold go; exactly the pruned ones above come back.
    assert s["evictions_last_cycle"] == j and s["allocations_last_cycle"] == j
    assert _live_rows(m, 1) == list(range(50, ROWS))
    assert _live_rows(m, 0) == list(range(50, ROWS))
    assert m.store.invariant_errors() == []
