"""Acceptance 2: store invariants hold over random batches and pruning cycles (store v2: entries
in per-pool hash tables, every byte within the budget). The issue-11 property test with
checkpoints, fallbacks and 10^7-row tables is test_properties_v2.py; this one is the small
three-table set of the other module tests, with the dense view checked against the store."""

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.store.sizing import full_table_bytes, slot_bytes

OPS = st.lists(st.sampled_from(["train", "train", "train", "prune", "eval"]), min_size=1, max_size=10)
ROWS, ID_RANGE = 2000, 40  # the budget pays for entries too: id spaces larger than the ids used


def _check_invariants(m: FiitedEmbeddingBagCollection) -> None:
    assert m.store.invariant_errors() == []
    s = m.stats()
    total = sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
    full = sum(full_table_bytes(t.num_embeddings, t.embedding_dim, m.config.optimizer)
               for t in m.embedding_bag_configs())
    assert s["bytes_full"] == full
    assert s["bytes"]["total"] == total <= m.config.budget * full
    # Every pool is sized to spend its budget but less than one chunk slot.
    spare = sum(slot_bytes(p.chunk_size, m.config.optimizer) for p in m.store.pools.values())
    # The module's one step counter (8 B) is charged to every pool (sizing.fixed_bytes), so each
    # pool stays within its own budget: the others' charges are unspent.
    spare += 8 * (len(m.store.pools) - 1)
    assert total > m.config.budget * full - spare
    for name, pool in m.store.pools.items():
        et = m.store.entries[name]
        # Live chunks hold distinct slots, never more than the pool has, and are exactly the
        # slots not on the free stack.
        live_slots = et.chunk_slots.reshape(-1)
        live_slots = live_slots[live_slots >= 0]
        assert torch.unique(live_slots).numel() == live_slots.numel() <= pool.capacity
        assert live_slots.numel() == pool.capacity - s["pools"][name]["free_slots"]
        assert live_slots.numel() == sum(pool.live_per_chunk.tolist())
        resident = et.index.keys[et.index.keys != -(2**63)]
        assert torch.unique(resident).numel() == resident.numel() == int(et.num_seen)


def _entries(m, table: str, rows: torch.Tensor) -> torch.Tensor:
    return m.store.entries_of(table).lookup(m.store.keys(table, rows))


def _check_dense_view(m: FiitedEmbeddingBagCollection) -> None:
    """dense_weights(): a resident row's live chunks are its pool slots' weights, every other
    chunk (pruned, or of a row without an entry) zeros."""
    dense = m.dense_weights()
    K = m.config.num_chunks
    for t in m.embedding_bag_configs():
        et, cp = m.store.entries_of(t.name), m.store.pool_of(t.name)
        slots = et.chunk_slots[_entries(m, t.name, torch.arange(t.num_embeddings))].to(torch.int64)
        chunks = dense[t.name].view(t.num_embeddings, K, -1)
        live = slots >= 0
        assert bool((chunks[~live] == 0).all())
        assert torch.equal(chunks[live], cp.weights[slots[live]])


def _check_forward_reads_store(m: FiitedEmbeddingBagCollection, kjt) -> None:
    """Eval forward of the batch equals pooling the logical (zero-padded) rows by hand."""
    m.eval()
    out = m(kjt).to_dict()
    m.train()
    dense = m.dense_weights()
    per_feature = kjt.to_dict()
    for t in m.embedding_bag_configs():
        for f in t.feature_names:
            jt = per_feature[f]
            rows = dense[t.name][jt.values()]
            bags = torch.zeros(jt.lengths().numel(), t.embedding_dim)
            bag_of = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths())
            bags.index_add_(0, bag_of, rows)
            torch.testing.assert_close(out[f], bags, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_chunks=st.sampled_from([1, 2, 4]),
    budget=st.floats(0.05, 1.0),
    ratio_mode=st.sampled_from(["manual", "dynamic"]),
    enforce_ratio=st.sampled_from([0.0, 0.05, 0.5]),
    ops=OPS,
    seed=st.integers(0, 2**16),
)
def test_invariants_over_random_training_and_cycles(num_chunks, budget, ratio_mode, enforce_ratio, ops, seed):
    cfg = FiitedConfig(num_chunks=num_chunks, budget=budget, ratio_mode=ratio_mode,
                       enforce_ratio=enforce_ratio, prune_interval=3, decay=0.9,
                       sample_size=32, seed=seed)
    tables = make_tables(rows=ROWS)
    m = FiitedEmbeddingBagCollection(tables, cfg)
    gen = torch.Generator().manual_seed(seed)
    for op in ops:
        kjt = random_kjt(tables, batch_size=5, gen=gen, max_len=6, id_range=ID_RANGE)
        if op == "train":
            m(kjt).values().pow(2).sum().backward()
        elif op == "prune":
            m.prune()
        else:
            _check_forward_reads_store(m, kjt)
        _check_invariants(m)
        _check_dense_view(m)
