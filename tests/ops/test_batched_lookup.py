"""The table-batched forward (``fiited::lookup_forward_batched_out``) against the reference.

F features of one pool in one call: random K and D, SUM/MEAN mixed per feature, weighted and
unweighted, pooling factors 1 and 20 (and features with no ids), pruned chunks, repeated ids,
empty bags; every feature's block must equal ``lookup_forward`` of that feature alone, and the
columns between blocks stay untouched.
"""

import itertools

import pytest
import torch

from tests.ops.test_native_parity import (
    ATOL, CUDA_SKIP_REASON, RTOL, Batch, make_batch, make_store,
)
from torchrec_fiited.ops import dispatch, native, reference

pytestmark = pytest.mark.skipif(
    not native.AVAILABLE, reason="native ops not built: run `make ext` (make test builds them)"
)

SENTINEL = 7.0


def _features(E, F, B, weighted, gen):
    """F features' bags back to back: (entries, offsets [F*B+1], weights, per-feature batches)."""
    batches, means = [], []
    for f in range(F):
        L = [1, 20, 0][int(torch.randint(0, 3, (1,), generator=gen))]  # 0: a feature with no ids
        b = make_batch(E, B, max(L, 1), weighted, False, gen)
        if L == 0:
            b = Batch(b.entries[:0], torch.zeros_like(b.offsets),
                      None if b.weights is None else b.weights[:0], b.row_of_id[:0], None)
        batches.append(b)
        means.append(bool(torch.rand(1, generator=gen) < 0.5))
    entries = torch.cat([b.entries for b in batches])
    starts = torch.tensor([0] + [b.entries.numel() for b in batches]).cumsum(0)
    offsets = torch.cat(
        [torch.zeros(1, dtype=torch.int64)] + [b.offsets[1:] + s for b, s in zip(batches, starts)]
    )
    weights = torch.cat([b.weights for b in batches]) if weighted else None
    return entries, offsets, weights, batches, means


def _columns(F, D, gen):
    """Feature blocks in a shuffled order with a gap of 3 columns before each."""
    order = torch.randperm(F, generator=gen).tolist()
    cols = [0] * F
    for j, f in enumerate(order):
        cols[f] = 3 + j * (D + 3)
    return torch.tensor(cols), 3 + F * (D + 3)


CASES = list(itertools.product([1, 2, 4, 8], [16, 64, 24], [False, True], [0.0, 0.5]))


@pytest.mark.parametrize("K,D,weighted,pruned", CASES)
def test_batched_matches_per_feature_lookups(K, D, weighted, pruned):
    gen = torch.Generator().manual_seed(K * 100 + D + 7 * weighted + int(10 * pruned))
    E, F, B = 300, 5, 33
    store = make_store(E, K, D // K, pruned, "sgd", 10, gen)
    entries, offsets, weights, batches, means = _features(E, F, B, weighted, gen)
    cols, width = _columns(F, D, gen)
    out = torch.full((B, width), SENTINEL)
    torch.ops.fiited.lookup_forward_batched_out(
        store.weights, store.chunk_slots, entries, offsets, weights, cols, torch.tensor(means), out
    )
    want = torch.full((B, width), SENTINEL)
    reference.lookup_forward_batched(
        store.weights, store.chunk_slots, entries, offsets, weights, cols, torch.tensor(means), want
    )
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    untouched = torch.ones(width, dtype=torch.bool)
    for f, (b, mean) in enumerate(zip(batches, means)):
        c = int(cols[f])
        alone = reference.lookup_forward(store.weights, store.chunk_slots, b.entries, b.offsets,
                                         b.weights, mean)
        torch.testing.assert_close(out[:, c : c + D], alone, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"feature {f} (mean={mean}): {m}")
        untouched[c : c + D] = False
    assert bool((out[:, untouched] == SENTINEL).all())


def test_dispatch_reference_path_matches_native(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    store = make_store(100, 4, 4, 0.3, "sgd", 5, gen)
    entries, offsets, weights, _, means = _features(100, 3, 9, True, gen)
    cols, width = _columns(3, 16, gen)
    outs = []
    for native_on in ("1", "0"):
        monkeypatch.setenv(dispatch.NATIVE_ENV, native_on)
        out = torch.full((9, width), SENTINEL)
        dispatch.lookup_forward_batched(store.weights, store.chunk_slots, entries, offsets, weights,
                                        cols, torch.tensor(means), out)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=RTOL, atol=ATOL)


def test_opcheck_batched():
    gen = torch.Generator().manual_seed(4)
    store = make_store(50, 2, 8, 0.5, "sgd", 5, gen)
    entries, offsets, weights, _, means = _features(50, 3, 6, True, gen)
    cols, width = _columns(3, 16, gen)
    torch.library.opcheck(
        torch.ops.fiited.lookup_forward_batched_out.default,
        (store.weights, store.chunk_slots, entries, offsets, weights, cols, torch.tensor(means),
         torch.zeros(6, width)),
    )


def test_bad_batched_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(5)
    store = make_store(50, 2, 8, 0.5, "sgd", 5, gen)
    entries, offsets, weights, _, means = _features(50, 3, 6, False, gen)
    cols, width = _columns(3, 16, gen)
    args = (store.weights, store.chunk_slots, entries, offsets, weights)
    op = torch.ops.fiited.lookup_forward_batched_out
    with pytest.raises(RuntimeError, match=r"offsets must hold F \* B \+ 1 boundaries for F=4"):
        op(*args, torch.cat([cols, cols[:1]]), torch.tensor(means + [False]), torch.zeros(6, width))
    with pytest.raises(RuntimeError, match=r"feature_cols\[1\]=.* outside out's"):
        bad = cols.clone()
        bad[1] = width - 3
        op(*args, bad, torch.tensor(means), torch.zeros(6, width))
    with pytest.raises(RuntimeError, match=r"feature_mean must be a 1-D Bool"):
        op(*args, cols, torch.tensor(means).long(), torch.zeros(6, width))
    with pytest.raises(RuntimeError, match=r"out.size\(0\) must be 6"):
        op(*args, cols, torch.tensor(means), torch.zeros(5, width))


@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in native.DEVICES),
                    reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("K,D", [(1, 64), (4, 64), (2, 16), (4, 24)])
def test_cuda_batched_matches_reference(K, D):
    gen = torch.Generator().manual_seed(K + D)
    for weighted, pruned in itertools.product([False, True], [0.0, 0.5]):
        store = make_store(300, K, D // K, pruned, "sgd", 10, gen)
        entries, offsets, weights, _, means = _features(300, 5, 33, weighted, gen)
        cols, width = _columns(5, D, gen)
        want = torch.full((33, width), SENTINEL)
        args = (store.weights, store.chunk_slots, entries, offsets, weights, cols, torch.tensor(means))
        reference.lookup_forward_batched(*args, want)
        on_gpu = [a.cuda() if torch.is_tensor(a) else a for a in args]
        got = torch.full((33, width), SENTINEL, device="cuda")
        torch.ops.fiited.lookup_forward_batched_out(*on_gpu, got)
        torch.testing.assert_close(got.cpu(), want, rtol=RTOL, atol=ATOL)
