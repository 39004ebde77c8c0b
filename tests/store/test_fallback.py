"""store/fallback.py: the hashed fallback reads bucket row_permutation(row, E) // width of the
id's row, pools only the ids marked missing, takes one optimizer step per fallback row from the
summed id gradients, and a shard's buckets are the unsharded table's (values and reads)."""

import pytest
import torch

from torchrec_fiited.ops import FusedParams
from torchrec_fiited.store import HashedFallback, row_permutation
from torchrec_fiited.store.fallback import FallbackGrid, bucket_width
from torchrec_fiited.store.layout import entry_key

E = 1000


def _fallback(rows: int = 7, dim: int = 4, optimizer: str = "sgd", seed: int = 11,
              lo: int = 0, hi: int = E, col_offset: int = 0) -> HashedFallback:
    grid = FallbackGrid(E, bucket_width(E, rows), lo, hi)
    return HashedFallback(grid, dim, optimizer, (-0.5, 0.5), seed, torch.device("cpu"), col_offset)


def _row(key: int, rows: int) -> int:
    """The fallback row, re-implemented: the permuted row's bucket of width ceil(E / rows)."""
    row = key & ((1 << 56) - 1)
    return int(row_permutation(torch.tensor([row]), E)[0]) // -(-E // rows)


def test_rows_of_is_the_bucket_of_the_permuted_row():
    fb = _fallback()
    assert fb.rows == 7 and fb.grid.width == 143
    keys = [0, 1, 5, 2**56 + 3, 3 * 2**56 + 999, 127 * 2**56 + 500]
    assert fb.rows_of(torch.tensor(keys)).tolist() == [_row(k, 7) for k in keys]
    every = fb.rows_of(torch.arange(E))
    assert torch.bincount(every).tolist() == [143] * 6 + [142]  # blocks of the permuted rows


@pytest.mark.parametrize("bounds", [[0, 500, 1000], [0, 250, 500, 750, 1000], [0, 333, 334, 1000]])
def test_a_row_shard_holds_the_whole_tables_buckets_that_meet_its_range(bounds):
    whole = _fallback(rows=30, dim=3, optimizer="rowwise_adagrad", col_offset=2)
    ids = torch.arange(E)
    permuted = row_permutation(ids, E)
    for lo, hi in zip(bounds, bounds[1:]):
        shard = _fallback(rows=30, dim=3, optimizer="rowwise_adagrad", lo=lo, hi=hi, col_offset=2)
        assert shard.grid.first == lo // 34 and shard.rows == (hi - 1) // 34 - lo // 34 + 1
        assert torch.equal(shard.weights, whole.weights[shard.grid.first : shard.grid.first + shard.rows])
        mine = ids[(permuted >= lo) & (permuted < hi)]
        keys = entry_key(3, mine)
        assert torch.equal(shard.rows_of(keys) + shard.grid.first, whole.rows_of(keys))
        assert shard.grid.split == (lo > 0 or hi < E)


def test_split_shards_sum_their_edge_gradients_like_one_table():
    """Two shards cutting a bucket step it with the gradient summed over both, as the whole
    table does, so their copies stay equal."""
    params = FusedParams("rowwise_adagrad", 0.1, 1e-8, 0.0, "grad_access", 0.9, 0)
    whole = _fallback(rows=30, optimizer="rowwise_adagrad")
    left = _fallback(rows=30, optimizer="rowwise_adagrad", lo=0, hi=500)
    right = _fallback(rows=30, optimizer="rowwise_adagrad", lo=500, hi=E)
    ids = torch.arange(E)
    permuted = row_permutation(ids, E)
    g = torch.randn(E, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    for step in range(3):
        pick = torch.randperm(E, generator=torch.Generator().manual_seed(step))[:400]
        whole.update(ids[pick], g[pick], params)
        for shard, side in ((left, permuted[pick] < 500), (right, permuted[pick] >= 500)):
            shard.accumulate(ids[pick][side], g[pick][side])
        every = torch.stack([left.edge_contribution(), right.edge_contribution()])
        left.flush(params, every)
        right.flush(params, every)
    cut = 500 // 34  # the bucket both hold
    assert left.grid.first + left.rows - 1 == cut == right.grid.first
    torch.testing.assert_close(left.weights[-1], right.weights[0], rtol=0, atol=0)
    torch.testing.assert_close(left.weights, whole.weights[: left.rows])
    torch.testing.assert_close(right.weights, whole.weights[cut:])
    torch.testing.assert_close(right.momentum, whole.momentum[cut:])


def test_initial_values_are_in_range_and_reproducible():
    a, b = _fallback(), _fallback()
    assert torch.equal(a.weights, b.weights)
    assert bool((a.weights >= -0.5).all()) and bool((a.weights < 0.5).all())
    assert a.weights.unique().numel() > 20  # drawn, not constant
    assert not torch.equal(a.weights, _fallback(seed=12).weights)


def test_pooled_reads_only_missing_ids():
    fb = _fallback()
    keys = torch.tensor([3, 4, 5, 6])
    miss = torch.tensor([True, False, True, True])
    offsets = torch.tensor([0, 2, 2, 4])  # bags [3, 4], [], [5, 6]
    w = fb.weights
    r = [_row(k, 7) for k in keys.tolist()]
    out = fb.pooled(keys, miss, offsets, None, mean=False)
    torch.testing.assert_close(out, torch.stack([w[r[0]], torch.zeros(4), w[r[2]] + w[r[3]]]))
    out = fb.pooled(keys, miss, offsets, torch.tensor([2.0, 1.0, 3.0, 1.0]), mean=True)
    torch.testing.assert_close(out, torch.stack([w[r[0]], torch.zeros(4), (3 * w[r[2]] + w[r[3]]) / 2]))


def test_update_sums_the_gradients_of_keys_sharing_a_row():
    fb = _fallback(rows=3)
    keys = torch.arange(40, dtype=torch.int64)
    rows = [_row(k, 3) for k in keys.tolist()]
    grads = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    before = fb.weights.clone()
    fb.update(keys, grads, FusedParams("sgd", 0.1, 1e-8, 0.0, "grad_access", 0.9, 0))
    want = before.clone()
    for k, r in enumerate(rows):
        want[r] -= 0.1 * grads[k]
    torch.testing.assert_close(fb.weights, want)


def test_rowwise_adagrad_state_is_per_fallback_row():
    fb = _fallback(rows=5, optimizer="rowwise_adagrad")
    assert fb.momentum.shape == (5,)
    key = torch.tensor([9])
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    r = _row(9, 5)
    before = fb.weights.clone()
    fb.update(key, g, FusedParams("rowwise_adagrad", 0.1, 1e-8, 0.0, "grad_access", 0.9, 0))
    state = (g * g).mean()
    assert torch.isclose(fb.momentum[r], state)
    torch.testing.assert_close(fb.weights[r], before[r] - 0.1 / (state.sqrt() + 1e-8) * g[0])
    assert torch.equal(torch.cat([fb.weights[:r], fb.weights[r + 1:]]), torch.cat([before[:r], before[r + 1:]]))


def test_empty_fallback_reads_zeros():
    fb = _fallback(rows=0)
    assert fb.weights.shape == (0, 4)
    fb.update(torch.tensor([1]), torch.ones(1, 4), FusedParams("sgd", 0.1, 1e-8, 0.0, "grad_access", 0.9, 0))
