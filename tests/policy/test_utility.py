"""The utility rule u = gamma * u + a * ||g||, against values worked out by hand, and its lazy decay
against an eager one that decays every entry at every step."""

import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.ops import FusedParams, fused_backward, native
from torchrec_fiited.ops.dispatch import NATIVE_ENV
from torchrec_fiited.policy import sample_pool

# Values of TORCHREC_FIITED_NATIVE: the native CPU kernels (when built) and the reference.
IMPLS = [
    pytest.param("1", id="native", marks=pytest.mark.skipif(
        "cpu" not in native.DEVICES, reason="native CPU ops not built")),
    pytest.param("0", id="reference"),
]
BUILT_IMPLS = ["0"] + (["1"] if "cpu" in native.DEVICES else [])

# Three steps of one table (4 rows, D=4, K=2: chunk 0 = columns 0-1, chunk 1 = columns 2-3),
# batch of 2 bags, loss = sum(C * pooled): bag b's pooled-output gradient is C[b].
#   step 0: bags [0, 1], [1]     C = [[3, 0, 0, 1], [0, 4, 0, 2]]
#   step 1: bags [2],    [0, 0]  C = [[1, 0, 0, 0], [0, 3, 4, 0]]
#   step 2: bags [1],    []      C = [[0, 0, 3, 4], [9, 9, 9, 9]]
STEPS = [
    ([0, 1, 1], [2, 1], [[3.0, 0, 0, 1], [0, 4, 0, 2]]),
    ([2, 0, 0], [1, 2], [[1.0, 0, 0, 0], [0, 3, 4, 0]]),
    ([1], [1, 0], [[0.0, 0, 3, 4], [9, 9, 9, 9]]),
]
GAMMA = 0.5
POOL = "shared_cs2"


def _train(utility: str) -> FiitedEmbeddingBagCollection:
    # Rows 0-3 of a 64-row table (store v2: the budget pays for entries too, so the id space is
    # larger than the rows touched). Budget 0.5 gives one bucket of 8 entries and 13 slots;
    # ratios (0, 0.9) make the admission quotas [12, 1], so on first touch rows 0, 1 and 2 get
    # chunk 0 and only row 0 gets chunk 1. Pruned chunks must score like live ones.
    table = EmbeddingBagConfig(name="t", num_embeddings=64, embedding_dim=4, feature_names=["f"])
    # No sketch (4 rows, every one first-touched into a free entry): its cells would take slots.
    cfg = FiitedConfig(num_chunks=2, budget=0.5, chunk_prune_ratios=[0.0, 0.9], decay=GAMMA,
                       utility=utility, prune_interval=0, optimizer="sgd", learning_rate=0.1,
                       sketch_fraction=0.0)
    m = FiitedEmbeddingBagCollection([table], cfg)
    capacity = m.store.pools[POOL].capacity
    assert capacity >= 4 and m._policies[POOL].admission_quota(capacity)[1] == 1, capacity
    for ids, lengths, C in STEPS:
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor(ids), torch.tensor(lengths))
        (m(kjt).values() * torch.tensor(C)).sum().backward()
    return m


def _rows(m: FiitedEmbeddingBagCollection):
    """Entry of each of rows 0-3 of table t (the null entry where not resident) and the table."""
    et = m.store.entries_of("t")
    return et.lookup(m.store.keys("t", torch.arange(4))), et


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_access_utilities_by_hand(impl):
    """By hand, with a = accesses of the row in the step and g = norm of the row's summed chunk
    gradient (gamma = 0.5):
      row 0: step 0 a=1, g=([3,0], [0,1]) -> (3, 1)
             step 1 a=2, g=2*([0,3], [4,0]) = ([0,6], [8,0]) -> 0.5 * (3, 1) + 2 * (6, 8) = (13.5, 16.5)
      row 1: step 0 a=2, g=([3,0] + [0,4], [0,1] + [0,2]) -> 2 * (5, 3) = (10, 6)
             (the norm of the summed gradient: summing the two ids' norms would give 2 * (7, 3))
             step 2 a=1, g=([0,0], [3,4]) -> 0.25 * (10, 6) + (0, 5) = (2.5, 6.5)
      row 2: step 1 a=1, g=([1,0], [0,0]) -> (1, 0)
      row 3: never seen.
    Scored at step 3 (the cycle after these steps), each row is decayed by gamma**(3 - its step):
      row 0: 0.25 * (13.5, 16.5); row 1: 0.5 * (2.5, 6.5); row 2: 0.25 * (1, 0).
    The table stores them against its base step 0 (no cycle yet): row 0 as (27, 33).
    """
    with mock.patch.dict(os.environ, {NATIVE_ENV: impl}):
        m = _train("grad_access")
        e, et = _rows(m)
        assert int(e[3]) == et.null_entry and bool((e[:3] != et.null_entry).all())
        assert (et.chunk_slots[e[:3], 0] >= 0).all() and et.chunk_slots[e[0], 1] >= 0
        assert et.chunk_slots[e[1], 1] < 0 and et.chunk_slots[e[2], 1] < 0  # pruned, yet scored
        assert int(et.utility_base) == 0
        torch.testing.assert_close(et.utilities[e[0]], torch.tensor([27.0, 33.0]), rtol=0, atol=1e-6)
        for row, step, want in [(0, 1, [13.5, 16.5]), (1, 2, [2.5, 6.5]), (2, 1, [1.0, 0.0])]:
            torch.testing.assert_close(et.utilities_at(e[row : row + 1], step),
                                       torch.tensor([want]), rtol=0, atol=1e-6)
        assert et.utilities[e[3]].tolist() == [0.0, 0.0]
        # The scoring path of a cycle: every seen row sampled (m >= seen), brought to step 3.
        sample = sample_pool(m.store, POOL, 100, int(m.steps_done), 3)
        assert int(m.steps_done) == 3
        assert sorted(sample.row_keys.tolist()) == m.store.keys("t", torch.arange(3)).tolist()
        by_row = torch.argsort(sample.row_keys)
        torch.testing.assert_close(
            sample.utilities[by_row],
            torch.tensor([[3.375, 4.125], [1.25, 3.25], [0.25, 0.0]]), rtol=0, atol=1e-6,
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_access_utilities_by_hand(impl):
    """utility="access": u = gamma * u + a. Row 0: 1, then 0.5 * 1 + 2 = 2.5 (step 1); row 1: 2,
    then 0.25 * 2 + 1 = 1.5 (step 2); row 2: 1 (step 1)."""
    with mock.patch.dict(os.environ, {NATIVE_ENV: impl}):
        e, et = _rows(_train("access"))
        for row, step, want in [(0, 1, 2.5), (1, 2, 1.5), (2, 1, 1.0), (3, 0, 0.0)]:
            torch.testing.assert_close(et.utilities_at(e[row : row + 1], step),
                                       torch.full((1, 2), want), rtol=0, atol=1e-6)


E, K, CS = 12, 2, 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gamma=st.floats(0.5, 1.0),
    steps=st.lists(
        st.tuples(st.integers(1, 4), st.lists(st.integers(0, E - 1), max_size=8), st.booleans()),
        min_size=1, max_size=12,
    ),
    seed=st.integers(0, 2**16),
    impl=st.sampled_from(BUILT_IMPLS),
)
def test_lazy_decay_equals_eager_decay(gamma, steps, seed, impl):
    """The store keeps u against a base step: an addition at step t is scaled by
    gamma**(base - t) (fused_backward's utility_scale) and a score multiplies by gamma**(t - base),
    as does a rebase (a cycle); an eager reference decays every entry at every step. Each drawn
    step: a gap of 1-4 steps (untouched steps still decay), the ids touched (repeats count as
    accesses), and whether the state is scored (and rebased) afterwards."""
    gen = torch.Generator().manual_seed(seed)
    utilities = torch.zeros(E, K)
    base = 0
    # Half the chunks live in a tiny pool; lr 0 so only the utilities move.
    chunk_slots = torch.full((E, K), -1, dtype=torch.int32)
    chunk_slots[: E // 2, 0] = torch.arange(E // 2, dtype=torch.int32)
    weights, momentum = torch.zeros(E // 2, CS), torch.zeros(0)
    eager = torch.zeros(E, K, dtype=torch.float64)
    t = -1
    with mock.patch.dict(os.environ, {NATIVE_ENV: impl}):
        for gap, ids, score in steps:
            for _ in range(gap):  # eager: every entry decays at every step
                t += 1
                eager *= gamma
            grads = torch.randn(len(ids), K * CS, generator=gen)
            for chunk in range(K):  # eager: a * ||sum of the row's chunk gradients||
                for e in set(ids):
                    rows = [i for i, x in enumerate(ids) if x == e]
                    g = grads[rows, chunk * CS : (chunk + 1) * CS].double().sum(0)
                    eager[e, chunk] += len(rows) * float(g.norm())
            params = FusedParams("sgd", 0.0, 1e-8, 0.0, "grad_access", gamma, t)
            fused_backward(
                grads, torch.arange(len(ids)), None, torch.tensor(ids, dtype=torch.int64),
                chunk_slots, utilities, weights, momentum, params, gamma ** (base - t),
            )
            if score:  # a cycle: scored, then stored as of now
                torch.testing.assert_close(
                    (utilities * gamma ** (t - base)).double(), eager, rtol=2e-5, atol=1e-5
                )
                utilities.mul_(gamma ** (t - base))
                base = t
        later = t + 3  # scored after idle steps: everything decays by gamma**3 more
        torch.testing.assert_close(
            (utilities * gamma ** (later - base)).double(), eager * gamma**3, rtol=2e-5, atol=1e-5
        )
