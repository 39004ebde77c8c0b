"""store/fallback.py: the hashed fallback reads mix64(key ^ salt) % rows, pools only the ids
marked missing, and takes one optimizer step per fallback row from the summed id gradients."""

import torch

from torchrec_fiited.ops import FusedParams
from torchrec_fiited.store import HashedFallback

U64 = (1 << 64) - 1


def _row(key: int, rows: int) -> int:
    """The fallback row, re-implemented: splitmix64's finalizer of key ^ salt, as int64, mod rows."""
    x = (key ^ 0x7F4A7C159E3779B9) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    x ^= x >> 31
    return (x - (1 << 64) if x >= 1 << 63 else x) % rows


def _fallback(rows: int = 7, dim: int = 4, optimizer: str = "sgd") -> HashedFallback:
    return HashedFallback(rows, dim, optimizer, (-0.5, 0.5), 11, torch.device("cpu"))


def test_rows_of_is_the_salted_splitmix_hash():
    fb = _fallback()
    keys = [0, 1, 5, 2**56 + 3, 3 * 2**56 + 10**7 - 1, 2**62]
    assert fb.rows_of(torch.tensor(keys)).tolist() == [_row(k, 7) for k in keys]


def test_initial_values_are_in_range_and_reproducible():
    a, b = _fallback(), _fallback()
    assert torch.equal(a.weights, b.weights)
    assert bool((a.weights >= -0.5).all()) and bool((a.weights < 0.5).all())
    assert a.weights.unique().numel() > 20  # drawn, not constant
    assert not torch.equal(a.weights, HashedFallback(7, 4, "sgd", (-0.5, 0.5), 12, torch.device("cpu")).weights)


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
    fb = HashedFallback(0, 4, "sgd", (-0.5, 0.5), 0, torch.device("cpu"))
    assert fb.weights.shape == (0, 4)
    fb.update(torch.tensor([1]), torch.ones(1, 4), FusedParams("sgd", 0.1, 1e-8, 0.0, "grad_access", 0.9, 0))
