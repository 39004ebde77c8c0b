"""Thresholds from a sample of m utilities land within a stated quantile error of the exact ones."""

import math

import pytest
import torch

from torchrec_fiited.policy import DynamicThresholdPolicy, ManualRatioPolicy, sample_pool
from torchrec_fiited.store import PoolSizes, TableLayout, VHPIStore

N, K, M = 100_000, 4, 4096
DELTA = 1e-3


def _population(seed: int = 0):
    """N resident rows of one table, K chunks; chunk 0's utility is the row index and chunk 1's
    the rank of the row's entry in storage (hash-slot) order, so a sample biased towards low or
    high rows, or towards the first or last entries, shows; chunks 2..K-1 independent random
    permutations of 0..N-1. Returns the store and the population fp32 [N, K] by row."""
    layout = TableLayout("t", N, K, 1, "p", 0.0, 1.0)
    # Hash table at load 1/4 (16 of 64 slots per bucket on average), so every row gets an entry.
    sizes = PoolSizes(slots=1, num_buckets=N // 16, bucket_size=64, sketch_width=0)
    store = VHPIStore([layout], {"p": sizes}, K, "sgd", torch.device("cpu"), seed=seed)
    keys = store.keys("t", torch.arange(N))
    store.admit("p", keys, 0, quota=[0] * K)  # resident, no chunk allocated
    et = store.entries["p"]
    entries = et.lookup(keys)
    assert int(et.num_seen) == N and bool((entries != et.null_entry).all())
    g = torch.Generator().manual_seed(seed)
    storage_rank = torch.argsort(torch.argsort(entries))
    columns = [torch.arange(N), storage_rank] + [torch.randperm(N, generator=g) for _ in range(K - 2)]
    population = torch.stack(columns, 1).to(torch.float32)
    et.utilities[entries] = population
    return store, population


def _bound(n: int) -> float:
    """Hoeffding (or DKW) at the two population quantiles q -/+ eps, delta / 2 each: with
    probability >= 1 - delta the empirical CDF of n draws is within eps = sqrt(ln(2 / delta) / (2n))
    of the population's at both, so the sample's q-quantile has population rank within q +/- eps,
    plus 1/n for the sample quantile's own rounding. Hoeffding holds for sampling without
    replacement too, and for a row's K values counted together (each row adds a number in [0, 1])."""
    return math.sqrt(math.log(2 / DELTA) / (2 * n)) + 1 / n


def _rank(population: torch.Tensor, threshold: float) -> float:
    """Fraction of ``population`` strictly below ``threshold``."""
    return float((population < threshold).double().mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_manual_thresholds_within_the_quantile_bound(seed):
    """Through the real path: Bernoulli sampling of m of N seen rows keyed by the counter
    generator (``sample_pool``), then one sampled quantile per chunk (the paper's fixed ratios).
    bound(n ~ 4096, delta = 1e-3) ~ 0.032."""
    store, population = _population(seed)
    ratios = [0.1, 0.5, 0.8, 0.95]
    policy = ManualRatioPolicy(ratios, enforce_ratio=0.0, fixed=True)
    sample = sample_pool(store, "p", M, 0, N)
    n = sample.utilities.shape[0]
    assert abs(n - M) <= 5 * math.sqrt(M)  # a Bernoulli(m / N) draw of N rows has ~m of them
    assert len(set(sample.row_keys.tolist())) == n
    decision = policy.decide(sample.utilities, sample.live, capacity=1, num_seen=N)
    for k, p in enumerate(ratios):
        assert abs(_rank(population[:, k], float(decision.thresholds[k])) - p) <= _bound(n), k


def test_dynamic_threshold_within_the_quantile_bound():
    """One global threshold over all K chunks, keeping capacity / (N K) = 0.3: its rank among the
    N K population utilities is within the bound of 0.7."""
    store, population = _population()
    policy = DynamicThresholdPolicy(K, enforce_ratio=0.0)
    sample = sample_pool(store, "p", M, 0, N)
    capacity = int(0.3 * N * K)
    decision = policy.decide(sample.utilities, sample.live, capacity=capacity, num_seen=N)
    assert decision.keep_fractions.tolist() == [0.3] * K
    population = population.reshape(-1)
    n = sample.utilities.shape[0]
    assert abs(_rank(population, float(decision.thresholds[0])) - 0.7) <= _bound(n)
