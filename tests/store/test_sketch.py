"""store/sketch.py: the count-min sketch never under-estimates a key's decayed utility, decays
at cycles by gamma ** age, and record_missed_utilities adds what an entry would have scored."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from torchrec_fiited.ops import FusedParams, native
from torchrec_fiited.policy import record_missed_utilities
from torchrec_fiited.store import UtilitySketch

K = 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 40),
    depth=st.integers(1, 4),
    gamma=st.floats(0.5, 1.0),
    rounds=st.lists(
        st.tuples(
            st.lists(st.integers(-(2**62), 2**62), min_size=0, max_size=12, unique=True),
            st.integers(0, 3),  # steps to the next decay (0: none)
        ),
        min_size=1, max_size=8,
    ),
    pool=st.lists(st.integers(0, 2**40), min_size=1, max_size=30, unique=True),
    seed=st.integers(0, 2**16),
)
def test_estimates_never_fall_below_the_decayed_truth(width, depth, gamma, rounds, pool, seed):
    """A model keeps each key's exact utility: additions, then at every decay_to everything times
    gamma ** age. The sketch (with collisions: width as small as 1) is >= it for every key, added
    or not, and with one key (no collision possible) equal to it up to bf16's rounding up: each
    add and decay rounds up by less than 2^-7 of the value (7 fraction bits)."""
    g = torch.Generator().manual_seed(seed)
    sketch = UtilitySketch(width, depth, K, torch.device("cpu"))
    truth = {}
    step = 0
    keys_seen = set(pool)
    for keys, gap in rounds:
        keys = [pool[k % len(pool)] for k in keys] if keys else []
        keys = list(dict.fromkeys(keys))  # distinct, as add() requires
        values = torch.rand(len(keys), K, generator=g) * 10
        sketch.add(torch.tensor(keys, dtype=torch.int64), values)
        for k, v in zip(keys, values):
            truth[k] = truth.get(k, torch.zeros(K, dtype=torch.float64)) + v.double()
        if gap:
            step += gap
            sketch.decay_to(step, gamma)
            truth = {k: v * gamma**gap for k, v in truth.items()}
        keys_seen |= set(keys)
    probe = sorted(keys_seen)
    est = sketch.estimate(torch.tensor(probe, dtype=torch.int64)).double()
    assert est.shape == (len(probe), K)
    for i, k in enumerate(probe):
        want = truth.get(k, torch.zeros(K, dtype=torch.float64))
        assert bool((est[i] >= want * (1 - 1e-6) - 1e-9).all()), (k, est[i], want)
    if len(truth) == 1:
        (k, v), = truth.items()
        roundings = 2 * len(rounds)
        assert bool((est[probe.index(k)] <= v * (1 + 2**-7) ** roundings + 1e-9).all())


def test_estimate_is_the_minimum_over_rows():
    """Two keys that share a cell in one row but not in the other: the other row gives each its
    own value (the depth is what buys back the collision)."""
    sketch = UtilitySketch(4, 2, 1, torch.device("cpu"))
    cells = sketch._cells(torch.arange(200, dtype=torch.int64))
    a, b = next((i, j) for i in range(200) for j in range(i + 1, 200)
                if cells[0, i] == cells[0, j] and cells[1, i] != cells[1, j])
    sketch.add(torch.tensor([a, b]), torch.tensor([[3.0], [5.0]]))
    assert sketch.estimate(torch.tensor([a, b])).squeeze(1).tolist() == [3.0, 5.0]
    assert sketch.counts[0, cells[0, a], 0] >= 5.0  # the shared cell covers both


def test_decay_multiplies_by_gamma_to_the_age_once_per_step():
    sketch = UtilitySketch(16, 2, K, torch.device("cpu"))
    keys = torch.tensor([11, 22], dtype=torch.int64)
    sketch.add(keys, torch.tensor([[8.0, 4.0], [2.0, 1.0]]))
    sketch.decay_to(3, 0.5)  # age 3 from step 0
    torch.testing.assert_close(sketch.estimate(keys), torch.tensor([[1.0, 0.5], [0.25, 0.125]]))
    assert int(sketch.decayed_to) == 3
    sketch.decay_to(3, 0.5)  # same step: nothing more
    sketch.decay_to(2, 0.5)  # an older step never decays (nor moves the clock back)
    torch.testing.assert_close(sketch.estimate(keys), torch.tensor([[1.0, 0.5], [0.25, 0.125]]))
    assert int(sketch.decayed_to) == 3
    sketch.decay_to(4, 0.5)
    torch.testing.assert_close(sketch.estimate(keys), torch.tensor([[0.5, 0.25], [0.125, 0.0625]]))
    sketch.decay_to(10, 1.0)  # gamma 1: no decay, clock still moves
    assert int(sketch.decayed_to) == 10
    torch.testing.assert_close(sketch.estimate(keys), torch.tensor([[0.5, 0.25], [0.125, 0.0625]]))


def test_empty_sketch_holds_nothing_and_estimates_zero():
    sketch = UtilitySketch(0, 2, K, torch.device("cpu"))
    assert sketch.counts.numel() == 0 and sketch.depth == 0
    sketch.add(torch.tensor([1, 2]), torch.ones(2, K))
    sketch.decay_to(5, 0.5)
    assert torch.equal(sketch.estimate(torch.tensor([1, 2, 3])), torch.zeros(3, K))


def test_depth_out_of_range_is_refused():
    with pytest.raises(ValueError, match="depth"):
        UtilitySketch(8, 5, K, torch.device("cpu"))


@pytest.mark.parametrize("utility", ["grad_access", "access"])
def test_record_missed_utilities_scores_like_an_entry(utility):
    """Repeated keys are summed first and a is their count: key 5 twice with chunk gradients
    ([3, 0], [0, 1]) and ([0, 4], [0, 2]) scores 2 * (||[3, 4]||, ||[0, 3]||) = (10, 6), as the
    fused backward scores an entry; key 9 once with ([1, 0], [0, 0]) scores (1, 0)."""
    sketch = UtilitySketch(1024, 2, K, torch.device("cpu"))
    keys = torch.tensor([5, 9, 5], dtype=torch.int64)
    grads = torch.tensor([[3.0, 0, 0, 1], [1, 0, 0, 0], [0, 4, 0, 2]])
    params = FusedParams("sgd", 0.1, 1e-8, 0.0, utility, 0.9, 0)
    record_missed_utilities(sketch, keys, grads, params)
    want = [[10.0, 6.0], [1.0, 0.0]] if utility == "grad_access" else [[2.0, 2.0], [1.0, 1.0]]
    torch.testing.assert_close(sketch.estimate(torch.tensor([5, 9])), torch.tensor(want))


@pytest.mark.skipif(not native.SKETCH_DEVICES, reason="native sketch ops not built")
@pytest.mark.parametrize("depth,width,num_chunks", [
    (1, 7, 1), (2, 13, 2), (4, 50, 4), (2, 3, 8), (1, 1, 2),
    (2, 1_000_003, 1), (1, 1 << 20, 1),  # the native cell index is a multiply, not a division
])
def test_native_sketch_ops_match_the_reference(monkeypatch, depth, width, num_chunks):
    """estimate / add / raise_to, native vs reference, bitwise: keys colliding in cells (small
    widths), negative keys, repeated rounds, any thread count."""
    sketches = {}
    for use_native in ("1", "0"):
        monkeypatch.setenv("TORCHREC_FIITED_NATIVE", use_native)
        sk = UtilitySketch(width, depth, num_chunks, torch.device("cpu"))
        g = torch.Generator().manual_seed(depth * 100 + width)
        estimates = []
        for _ in range(5):
            keys = torch.unique(torch.randint(-(2**40), 2**40, (60,), generator=g))
            sk.add(keys, torch.rand(keys.numel(), num_chunks, generator=g) * 3)
            estimates.append(sk.estimate(keys[::2]))
            sk.raise_to(keys[::3], torch.rand(keys[::3].numel(), num_chunks, generator=g) * 5)
        sketches[use_native] = (sk.counts.clone(), estimates)
    assert torch.equal(sketches["1"][0], sketches["0"][0])
    for a, b in zip(sketches["1"][1], sketches["0"][1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not native.SKETCH_DEVICES, reason="native sketch ops not built")
def test_native_sketch_ops_refuse_bad_input_with_the_sketch_unchanged():
    sk = UtilitySketch(11, 2, K, torch.device("cpu"))
    sk.add(torch.tensor([1, 2, 3]), torch.ones(3, K))
    before = sk.counts.clone()
    with pytest.raises(RuntimeError, match=r"values must be fp32 \(n=2, K=2\)"):
        torch.ops.fiited.sketch_raise(sk.counts, torch.tensor([4, 5]), torch.ones(3, K), True, [1, 2])
    with pytest.raises(RuntimeError, match="one salt per row, got 1 salts for 2 rows"):
        torch.ops.fiited.sketch_estimate(sk.counts, torch.tensor([4, 5]), [1])
    assert torch.equal(sk.counts, before)


def test_decay_block_by_block_equals_the_whole_sketch_at_once():
    """decay_to works in blocks of cells (bounded temporaries); a sketch of more than one block
    ends bitwise where rounding the whole fp32 product up to bf16 at once does."""
    from torchrec_fiited.store.sketch import _DECAY_BLOCK, ceil_bf16

    width = _DECAY_BLOCK // 4 + 123  # depth 2 x K 2: just over one block of cells
    sketch = UtilitySketch(width, 2, K, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    sketch.counts.copy_(ceil_bf16(torch.rand(sketch.counts.shape, generator=g) * 100))
    want = ceil_bf16(sketch.counts.float() * 0.97**5)
    sketch.decay_to(5, 0.97)
    assert sketch.counts.numel() > _DECAY_BLOCK
    assert torch.equal(sketch.counts, want)
