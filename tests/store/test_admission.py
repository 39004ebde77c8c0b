"""Admission (``VHPIStore.admit``) and erasure in the pruning cycle (``policy.apply_decision``).

One pool with a single hash bucket of 8 entries, so every key competes with every resident.
"""

import pytest
import torch

from torchrec_fiited.policy import PruneDecision, apply_decision
from torchrec_fiited.store import PRUNED, PoolSizes, TableLayout, VHPIStore

K, POOL, W = 2, "p", 8
GAMMA = 0.5


def _store(slots: int = 16, sketch_width: int = 4096) -> VHPIStore:
    layout = TableLayout("t", 10**6, 4, 2, POOL, -0.1, 0.1)
    sizes = PoolSizes(slots=slots, num_buckets=1, bucket_size=W, sketch_width=sketch_width)
    return VHPIStore([layout], {POOL: sizes}, K, "sgd", torch.device("cpu"), seed=3,
                     utility_decay=GAMMA)


def _keys(store: VHPIStore, rows) -> torch.Tensor:
    return store.keys("t", torch.as_tensor(rows, dtype=torch.int64))


def _entries(store: VHPIStore, rows) -> torch.Tensor:
    return store.entries[POOL].lookup(_keys(store, rows))


def _resident_rows(store: VHPIStore):
    et = store.entries[POOL]
    keys = et.keys_of(et.seen())
    return sorted((keys & ((1 << 56) - 1)).tolist())


def _fill_with_candidates(store: VHPIStore, scores):
    """Rows 0..7 resident without chunks (quota 0), hash-table scores ``scores`` (as a cycle
    sets them: row utility), utilities (2, 3) as of step 0."""
    store.admit(POOL, _keys(store, range(W)), 0, quota=[0] * K)
    et = store.entries[POOL]
    e = _entries(store, range(W))
    assert bool((e != et.null_entry).all()) and int(et.num_seen) == W
    assert bool((et.chunk_slots[e] == PRUNED).all())
    et.index.scores[e] = torch.tensor(scores, dtype=torch.float32)
    et.utilities[e] = torch.tensor([2.0, 3.0])
    return e


def _estimate(store: VHPIStore, rows, values) -> None:
    store.sketches[POOL].add(_keys(store, rows), torch.tensor(values, dtype=torch.float32))


def test_a_free_slot_takes_any_key():
    store = _store()
    store.admit(POOL, _keys(store, [5, 6, 7]), 4, quota=[0] * K)
    et = store.entries[POOL]
    e = _entries(store, [5, 6, 7])
    assert bool((e != et.null_entry).all()) and int(et.num_seen) == 3
    assert store.invariant_errors() == []


@pytest.mark.parametrize("estimate", [[0.5, 0.5], [0.9, 0.0], [0.0, 0.0]])
def test_a_key_that_does_not_beat_the_weakest_stays_out(estimate):
    """The weakest candidate scores 1: an estimate summing to 1 (a tie) or less does not enter."""
    store = _store()
    _fill_with_candidates(store, [3, 1, 4, 1.5, 9, 2, 6, 5])
    before = {k: v.clone() for k, v in store.state_dict().items()}
    _estimate(store, [100], [estimate])
    store.admit(POOL, _keys(store, [100]), 2, quota=[K] * K)
    assert int(_entries(store, [100])[0]) == store.entries[POOL].null_entry
    assert _resident_rows(store) == list(range(W))
    after = store.state_dict()
    for k, v in before.items():
        if not k.startswith("sketches."):
            assert torch.equal(v, after[k]), k


def test_a_key_that_beats_the_weakest_displaces_exactly_it():
    """Scores [3, 1, 4, 1.5, 9, 2, 6, 5]: a key estimated at 1.5 (> 1) takes row 1's entry. Row 1's
    utilities (2, 3) as of step 0, decayed to step 2 (x 0.25), go to the sketch under its key; the
    new entry starts with its own estimate, as of step 2."""
    store = _store()
    e = _fill_with_candidates(store, [3, 1, 4, 1.5, 9, 2, 6, 5])
    sketch, et = store.sketches[POOL], store.entries[POOL]
    cells = sketch._cells(_keys(store, [1, 100]))
    assert bool((cells[:, 0] != cells[:, 1]).all())  # no collision: estimates below are exact
    _estimate(store, [100], [[1.0, 0.5]])
    store.admit(POOL, _keys(store, [100]), 2, quota=[0] * K)
    assert _resident_rows(store) == [0] + list(range(2, W)) + [100]
    new = int(_entries(store, [100])[0])
    assert new == int(e[1])  # the displaced entry's slot
    # Stored against the table's base step 0: x 0.5^-2; read back as of step 2.
    assert et.utilities[new].tolist() == [4.0, 2.0]
    assert et.utilities_at(torch.tensor([new]), 2).tolist() == [[1.0, 0.5]]
    torch.testing.assert_close(sketch.estimate(_keys(store, [1])), torch.tensor([[0.5, 0.75]]))
    assert int(et.num_seen) == W
    assert store.invariant_errors() == []


def test_a_displaced_entry_frees_its_chunks():
    """An entry holding chunks whose score is finite (not protected) is displaced like any other:
    its two slots go back to the pool, and the newcomer's chunks are freshly initialised."""
    store = _store(slots=4)
    e = _fill_with_candidates(store, [3, 1, 4, 1.5, 9, 2, 6, 5])
    cp, et = store.pools[POOL], store.entries[POOL]
    store.allocate(POOL, e[[1, 1, 2]], torch.tensor([0, 1, 0]), 1)
    cp.weights[et.chunk_slots[e[1]].long()] = 7.0  # trained values that must not leak
    assert cp.free_count() == 1 and cp.live_per_chunk.tolist() == [2, 1]
    _estimate(store, [100], [[2.0, 0.0]])
    store.admit(POOL, _keys(store, [100]), 2, quota=[0] * K)
    assert int(_entries(store, [100])[0]) == int(e[1])
    assert cp.free_count() == 3 and cp.live_per_chunk.tolist() == [1, 0]
    assert bool((et.chunk_slots[e[1]] == PRUNED).all())
    assert store.invariant_errors() == []
    # Next admission of another newcomer with a quota: its chunks come from the freed slots.
    _estimate(store, [101], [[9.0, 0.0]])
    store.admit(POOL, _keys(store, [101]), 3, quota=[4, 4])
    new = int(_entries(store, [101])[0])
    assert new != et.null_entry and bool((et.chunk_slots[new] >= 0).all())
    slots = et.chunk_slots[new].long()
    want = store.init_values("t", torch.tensor([101, 101]), torch.tensor([0, 1]), 3)
    assert torch.equal(cp.weights[slots], want)
    assert store.invariant_errors() == []


def test_entries_holding_chunks_are_protected_from_admission():
    store = _store(slots=16)
    store.admit(POOL, _keys(store, range(W)), 0, quota=[W, W])
    et = store.entries[POOL]
    e = _entries(store, range(W))
    assert bool((et.chunk_slots[e] >= 0).all())
    assert bool(torch.isinf(et.index.scores[e]).all())
    _estimate(store, [100], [[1e30, 1e30]])
    store.admit(POOL, _keys(store, [100]), 1, quota=[W, W])
    assert _resident_rows(store) == list(range(W))
    assert store.invariant_errors() == []


def test_new_entries_get_chunks_by_descending_estimate_within_quota_and_free_slots():
    """Estimates 1 < 3 < 2 (rows 10, 11, 12). Quotas [2, 1]: rows 11 and 12 get chunk 0, row 11
    chunk 1. Then a pool with 2 free slots and quotas [8, 8]: the two best of rows 20-22 get chunk 0,
    and none is left for chunk 1."""
    store = _store(slots=16)
    _estimate(store, [10, 11, 12], [[1.0, 0.0], [1.0, 2.0], [2.0, 0.0]])
    store.admit(POOL, _keys(store, [10, 11, 12]), 0, quota=[2, 1])
    et = store.entries[POOL]
    live = (et.chunk_slots[_entries(store, [10, 11, 12])] >= 0).tolist()
    assert live == [[False, False], [True, True], [True, False]]

    store = _store(slots=2)
    _estimate(store, [20, 21, 22], [[5.0, 0.0], [1.0, 0.0], [7.0, 0.0]])
    store.admit(POOL, _keys(store, [20, 21, 22]), 0, quota=[8, 8])
    et = store.entries[POOL]
    live = (et.chunk_slots[_entries(store, [20, 21, 22])] >= 0).tolist()
    assert live == [[True, False], [False, False], [True, False]]
    assert store.invariant_errors() == []


def _cycle_store(sketch_width: int) -> VHPIStore:
    """Rows 0, 1 hold chunk 0; rows 2, 3 hold nothing. Utilities as of step 0."""
    store = _store(slots=16, sketch_width=sketch_width)
    store.admit(POOL, _keys(store, [0, 1, 2, 3]), 0, quota=[0] * K)
    e = _entries(store, [0, 1, 2, 3])
    store.allocate(POOL, e[:2], torch.zeros(2, dtype=torch.int64), 0)
    store.entries[POOL].utilities[e] = torch.tensor([[5.0, 1.0], [4.0, 1.0], [0.5, 0.1], [0.2, 0.2]])
    return store


@pytest.mark.parametrize("sketch_width", [0, 4096])
def test_cycle_erases_chunkless_entries_only_when_the_pool_has_a_sketch(sketch_width):
    """Thresholds (1, 10) at step 2 (utilities x 0.25): nothing is evicted (not enforced) and
    nothing is allocated (no pruned chunk above its threshold). Rows 2 and 3 are left without a
    chunk: with a sketch they are erased and their decayed utilities go to it; without one (a
    pool that holds every row) they stay resident, scored by their row utility."""
    store = _cycle_store(sketch_width)
    decision = PruneDecision(torch.tensor([1.0, 10.0]), torch.ones(K, dtype=torch.float64), 0.0, False)
    counts = apply_decision(store, POOL, decision, 2)  # the store's decay: GAMMA
    assert counts.evictions == {"t": 0} and counts.allocations == {"t": 0}
    et = store.entries[POOL]
    e01 = _entries(store, [0, 1])
    assert bool(torch.isinf(et.index.scores[e01]).all())  # holding chunks: protected
    if sketch_width:
        assert counts.erased == {"t": 2}
        assert _resident_rows(store) == [0, 1] and int(et.num_seen) == 2
        est = store.sketches[POOL].estimate(_keys(store, [2, 3]))
        want = torch.tensor([[0.125, 0.025], [0.05, 0.05]])
        assert bool((est >= want).all())  # bf16 cells, rounded up
        torch.testing.assert_close(est, want, rtol=2**-7, atol=0)
        assert int(store.sketches[POOL].decayed_to) == 2
    else:
        assert counts.erased == {"t": 0}
        assert _resident_rows(store) == [0, 1, 2, 3] and int(et.num_seen) == 4
        e23 = _entries(store, [2, 3])
        torch.testing.assert_close(et.index.scores[e23], torch.tensor([0.15, 0.1]))
    assert store.invariant_errors() == []


def test_erase_frees_chunks_and_forgets_the_entry():
    store = _cycle_store(4096)
    et, cp = store.entries[POOL], store.pools[POOL]
    e = _entries(store, [0])
    store.erase(POOL, e, torch.tensor([[1.0, 2.0]]))
    assert int(_entries(store, [0])[0]) == et.null_entry
    assert bool((et.utilities[e] == 0).all()) and bool((et.chunk_slots[e] == PRUNED).all())
    assert cp.free_count() == 15 and cp.live_per_chunk.tolist() == [1, 0]
    torch.testing.assert_close(store.sketches[POOL].estimate(_keys(store, [0])), torch.tensor([[1.0, 2.0]]))
    assert store.invariant_errors() == []


def test_an_id_going_in_and_out_keeps_its_estimate():
    # An entry admitted with its sketch estimate and erased again without new gradient must
    # leave the sketch where it was. Adding its utility back on release (it already holds the
    # estimate) doubled the estimate every round trip: utilities grew 2.5x per cycle and
    # FIITED K=2 at budget 0.1 lost 0.13 AUC on the hard preset.
    store = _store()
    _estimate(store, [42], [[1.5, 0.25]])
    et = store.entries[POOL]
    for step in range(5):
        store.admit(POOL, _keys(store, [42]), step, quota=[0] * K)
        e = _entries(store, [42])
        assert bool((e != et.null_entry).all())
        assert et.utilities_at(e, step).tolist() == [[1.5, 0.25]]
        store.erase(POOL, e, et.utilities_at(e, step))  # no decay: same step, no new gradient
        assert _entries(store, [42]).tolist() == [et.null_entry]
    assert store.sketches[POOL].estimate(_keys(store, [42])).tolist() == [[1.5, 0.25]]
    assert store.invariant_errors() == []


def test_allocate_across_tables_gives_each_chunk_its_per_table_init():
    """allocate initialises all tables of a pool in one pass; every chunk must hold exactly what
    init_values gives its table, global row, chunk and step (the per-table definition)."""
    layouts = [
        TableLayout("a", 1000, 4, 2, POOL, -0.1, 0.1, table_index=0),
        TableLayout("b", 500, 4, 2, POOL, -0.3, 0.25, global_name="B", row_offset=100,
                    chunk_offset=1, table_index=5),
        TableLayout("c", 10**9, 4, 2, POOL, -1.0, 1.0, table_index=127),
    ]
    sizes = PoolSizes(slots=64, num_buckets=2, bucket_size=W, sketch_width=0)
    store = VHPIStore(layouts, {POOL: sizes}, K, "rowwise_adagrad", torch.device("cpu"), seed=11)
    keys = torch.cat([store.keys("a", torch.tensor([1, 999])), store.keys("b", torch.tensor([0, 7])),
                      store.keys("c", torch.tensor([123456789]))])
    slots, _ = store.admit(POOL, keys, 9, quota=[0, 0])
    entries = slots[slots >= 0]
    assert entries.numel() == 5
    chunk_ids = torch.tensor([0, 1, 1, 0, 1])
    store.allocate(POOL, entries, chunk_ids, step=9)
    et, cp = store.entries[POOL], store.pools[POOL]
    for e, k in zip(entries.tolist(), chunk_ids.tolist()):
        key = int(et.keys_of(torch.tensor([e])))
        table = {0: "a", 5: "b", 127: "c"}[key >> 56]
        row = torch.tensor([key & ((1 << 56) - 1)])
        want = store.init_values(table, row, torch.tensor([k]), 9)[0]
        assert torch.equal(cp.weights[int(et.chunk_slots[e, k])], want), (table, k)
