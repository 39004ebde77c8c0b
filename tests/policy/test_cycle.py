"""Enforced pruning: eviction runs only when more than ``enforce_ratio`` of the sampled chunks sit
on the wrong side of their thresholds; allocation of pruned chunks above them runs either way;
then (the pool has a sketch) entries left without a live chunk are erased."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

ROWS = 100  # rows touched
ID_SPACE = 2000  # store v2: budget 1 pays for entries too, so the table is larger than ROWS
POOL = "shared_cs1"


def _entries(m: FiitedEmbeddingBagCollection, rows: torch.Tensor) -> torch.Tensor:
    return m.store.entries_of("t").lookup(m.store.keys("t", rows))


def _pool_with_wrong_chunks(j: int, enforce_ratio: float) -> FiitedEmbeddingBagCollection:
    """100 rows of a 2000-row table, K=2, the paper's fixed ratios (0.5, 0.5), budget 1 (442
    slots: the pool never binds).

    Both chunks of row e have utility e, so each threshold is the sampled median, 50 (every row
    is sampled: sample_size >= rows). Chunk 0 is live exactly for rows 50..99 (all on the right
    side). Chunk 1 has 2j chunks on the wrong side: rows 0..j-1 live below the threshold, rows
    100-j..99 pruned above it; so the churn is 2j of 200 sampled chunks.
    """
    table = EmbeddingBagConfig(name="t", num_embeddings=ID_SPACE, embedding_dim=2, feature_names=["f"])
    cfg = FiitedConfig(num_chunks=2, budget=1.0, chunk_prune_ratios=[0.5, 0.5], ratio_target="ratios",
                       enforce_ratio=enforce_ratio, sample_size=1000, prune_interval=0, decay=1.0)
    m = FiitedEmbeddingBagCollection([table], cfg)
    assert m.store.pools[POOL].capacity >= 2 * ROWS
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.arange(ROWS), torch.ones(ROWS, dtype=torch.int64))
    m(kjt).values().sum().backward()  # every row seen, both chunks admitted
    et = m.store.entries[POOL]
    rows = torch.arange(ROWS)
    e = _entries(m, rows)
    assert bool((e != et.null_entry).all()) and int(et.num_seen) == ROWS
    assert bool((et.chunk_slots[e] >= 0).all())
    et.utilities[e] = torch.arange(ROWS, dtype=torch.float32).unsqueeze(1).expand(ROWS, 2)
    m.store.evict(POOL, e[:50], torch.zeros(50, dtype=torch.int64))
    pruned_1 = e[torch.cat([rows[j:50], rows[ROWS - j :]])]
    m.store.evict(POOL, pruned_1, torch.ones_like(pruned_1))
    assert m.store.invariant_errors() == []
    return m


def _live_rows(m, chunk: int):
    e = _entries(m, torch.arange(ROWS))
    return (m.store.entries[POOL].chunk_slots[e, chunk] >= 0).nonzero().squeeze(1).tolist()


def _resident_rows(m):
    return (_entries(m, torch.arange(ROWS)) != m.store.entries[POOL].null_entry).nonzero().squeeze(1).tolist()


# (enforce_ratio, j): churn = j / 100 at or below the ratio, the last one exactly at it.
@pytest.mark.parametrize("enforce_ratio,j", [(0.055, 0), (0.055, 5), (0.05, 5)])
def test_no_eviction_while_churn_stays_at_or_below_enforce_ratio(enforce_ratio, j):
    m = _pool_with_wrong_chunks(j, enforce_ratio)
    report = m.prune()[POOL]
    assert report["thresholds"] == [50.0, 50.0]
    assert report["churn"] == 2 * j / 200
    assert not report["enforced"]
    s = m.stats()["tables"]["t"]
    assert s["evictions_last_cycle"] == 0 and s["allocations_last_cycle"] == j
    # The wrong live chunks stay; the pruned ones above the threshold come back (slots are free).
    assert _live_rows(m, 1) == list(range(j)) + list(range(50, ROWS))
    assert _live_rows(m, 0) == list(range(50, ROWS))
    # Rows j..49 hold no live chunk after the cycle: erased (their utility goes to the sketch).
    assert s["erased_last_cycle"] == 50 - j
    assert _resident_rows(m) == list(range(j)) + list(range(50, ROWS))
    assert m.store.invariant_errors() == []


@pytest.mark.parametrize("enforce_ratio,j", [(0.055, 6), (0.055, 20), (0.045, 5)])
def test_eviction_once_churn_exceeds_enforce_ratio(enforce_ratio, j):
    m = _pool_with_wrong_chunks(j, enforce_ratio)
    report = m.prune()[POOL]
    assert report["thresholds"] == [50.0, 50.0]
    assert report["churn"] == 2 * j / 200
    assert report["enforced"]
    s = m.stats()["tables"]["t"]
    # Exactly the live chunks below the threshold go; exactly the pruned ones above come back.
    assert s["evictions_last_cycle"] == j and s["allocations_last_cycle"] == j
    assert _live_rows(m, 1) == list(range(50, ROWS))
    assert _live_rows(m, 0) == list(range(50, ROWS))
    assert s["erased_last_cycle"] == 50
    assert _resident_rows(m) == list(range(50, ROWS))
    assert m.store.invariant_errors() == []
