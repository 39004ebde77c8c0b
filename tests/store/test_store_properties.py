"""Acceptance 2: store invariants hold over random batches and pruning cycles."""

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.store import live_from_mask

OPS = st.lists(st.sampled_from(["train", "train", "train", "prune", "eval"]), min_size=1, max_size=10)


def _check_invariants(m: FiitedEmbeddingBagCollection) -> None:
    assert m.store.invariant_errors() == []
    s = m.stats()
    assert s["bytes"]["total"] == sum(
        t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters())
    )
    for name, pool in m.store.pools.items():
        layouts = [l for l in m.store.layouts.values() if l.pool == name]
        slots_in_budget = m.config.budget * sum(l.num_entries * l.dim for l in layouts) / pool.chunk_size
        # The allocated tensor is the largest whole number of slots within the budget (up to the
        # float noise plan_pools forgives: budget 0.9999999999999999 still gets every slot).
        assert pool.weights.shape == (pool.capacity, pool.chunk_size)
        assert pool.capacity <= slots_in_budget * (1 + 1e-9) and pool.capacity + 1 > slots_in_budget
        # Live chunks, counted from the entry tables, hold distinct slots, never more than the
        # pool has, and are exactly the slots not on the free stack.
        live_slots = torch.cat([m.store.tables[l.name].chunk_slots.reshape(-1) for l in layouts])
        live_slots = live_slots[live_slots >= 0]
        assert torch.unique(live_slots).numel() == live_slots.numel() <= pool.capacity
        assert live_slots.numel() == pool.capacity - s["pools"][name]["free_slots"]
        assert live_slots.numel() == sum(pool.live_per_chunk.tolist())
    for name, et in m.store.tables.items():
        assert torch.equal(live_from_mask(et.live_mask, m.config.num_chunks), et.chunk_slots >= 0)


def _check_pruned_reads_zero(m: FiitedEmbeddingBagCollection) -> None:
    dense = m.dense_weights()
    K = m.config.num_chunks
    for name, et in m.store.tables.items():
        live = et.chunk_slots >= 0
        chunks = dense[name].view(et.num_entries, K, -1)
        assert bool((chunks[~live] == 0).all())
        fully_pruned = ~live.any(1)
        assert bool((dense[name][fully_pruned] == 0).all())


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
    tables = make_tables(rows=40)
    m = FiitedEmbeddingBagCollection(tables, cfg)
    gen = torch.Generator().manual_seed(seed)
    for op in ops:
        kjt = random_kjt(tables, batch_size=5, gen=gen, max_len=6)
        if op == "train":
            m(kjt).values().pow(2).sum().backward()
        elif op == "prune":
            m.prune()
        else:
            _check_forward_reads_store(m, kjt)
        _check_invariants(m)
        _check_pruned_reads_zero(m)
