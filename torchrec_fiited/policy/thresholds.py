"""Pruning thresholds from sampled utilities: per chunk index (manual) or global (dynamic).

Targets are stated in live chunks, not in ratios of the hash space, so a pool is filled whatever
fraction of a table's entries the data actually touches: with every entry seen, manual mode keeps
exactly (1 - p_k) of chunk k, as in the paper; with fewer seen, the same shares of the pool.
"""

import abc
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from torchrec_fiited.policy.ratios import chunk_shares


@dataclass(frozen=True)
class PruneDecision:
    """What one pruning cycle does to one pool.

    Args:
        thresholds: fp32 [K]; a live chunk below its threshold is evicted (when enforced), a
            pruned chunk above it is allocated again (while slots are free).
        keep_fractions: fp64 [K], the fraction of seen entries each chunk index should keep.
        churn: fraction of sampled chunks on the wrong side of their threshold.
        enforce: whether churn exceeded ``enforce_ratio``, so eviction runs.
    """

    thresholds: torch.Tensor
    keep_fractions: torch.Tensor
    churn: float
    enforce: bool


class ThresholdPolicy(abc.ABC):
    """Turns sampled utilities into per-chunk thresholds for one pool.

    Args:
        num_chunks: K.
        enforce_ratio: churn above which enforced pruning (eviction) runs.
    """

    def __init__(self, num_chunks: int, enforce_ratio: float) -> None:
        self.num_chunks = num_chunks
        self.enforce_ratio = enforce_ratio

    @abc.abstractmethod
    def keep_fractions(self, capacity: int, num_seen: int) -> torch.Tensor:
        """Fraction of seen entries whose chunk k should be live, fp64 [K] in [0, 1]."""

    @abc.abstractmethod
    def thresholds(self, sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Thresholds fp32 [K] from sampled utilities fp32 [m, K]."""

    @abc.abstractmethod
    def admission_quota(self, capacity: int) -> List[int]:
        """Live chunks per chunk index that first-touch admission may fill, [K]."""

    def split_thresholds(self, sample: torch.Tensor, present: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
        """Thresholds fp32 [K] over the ``present`` (bool [m, K]) samples of each chunk."""
        return torch.stack(
            [_quantile_threshold(sample[present[:, k], k], float(keep[k]))
             for k in range(self.num_chunks)]
        ).to(torch.float32)

    def decide(
        self, sample: torch.Tensor, sample_live: torch.Tensor, capacity: int, num_seen: int,
        present: Optional[torch.Tensor] = None, seen_per_chunk: Optional[Sequence[int]] = None,
    ) -> PruneDecision:
        """Thresholds and the enforced-pruning check for sampled chunks (fp32 / bool [m, K]).

        ``present`` (bool [m, K]) and ``seen_per_chunk`` ([K]) describe samples of column
        shards, whose pools admit rows on their own: a sampled row absent from chunk k's shard
        has no utility there (not zero), so chunk k's threshold is the quantile over the rows
        its shards hold, at the fraction of them that keeps ``keep[k] x num_seen`` live.
        """
        keep = self.keep_fractions(capacity, num_seen)
        if present is None or bool(present.all()):
            thr = self.thresholds(sample, keep)
        else:
            seen = torch.tensor([max(1, int(n)) for n in seen_per_chunk], dtype=torch.float64)
            thr = self.split_thresholds(sample, present, (keep * num_seen / seen).clamp(max=1.0))
            sample_live = sample_live & present
            # Absent chunks cross nothing: they are neither live nor due a slot here.
            sample = torch.where(present, sample, thr.expand_as(sample))
        crossing = (sample_live & (sample < thr)) | (~sample_live & (sample > thr))
        # Counted exactly: a float32 mean makes 10 of 200 0.0500000007 > 0.05, enforcing at the ratio.
        churn = int(crossing.sum()) / crossing.numel() if crossing.numel() else 0.0
        return PruneDecision(thr, keep, churn, churn > self.enforce_ratio)


def _quantile_threshold(values: torch.Tensor, keep: float) -> torch.Tensor:
    """The value below which a fraction (1 - keep) of ``values`` fp32 [n] lies."""
    if keep >= 1.0:
        return torch.tensor(0.0)  # utilities are >= 0: nothing is below, everything may come back
    if keep <= 0.0 or values.numel() == 0:
        return torch.tensor(float("inf"))
    ordered = torch.sort(values).values
    # The epsilon keeps (1 - 0.8) * 5 = 0.99999... from flooring to 0.
    idx = min(math.floor((1.0 - keep) * values.numel() + 1e-9), values.numel() - 1)
    return ordered[idx]


class ManualRatioPolicy(ThresholdPolicy):
    """One threshold per chunk index, from per-chunk pruning ratios p_k.

    Args:
        ratios: p_k for k in [0, K), fitted or given.
        enforce_ratio: see ``ThresholdPolicy``.
        fixed: keep exactly (1 - p_k) of the seen entries' chunk k (the paper's rule) instead
            of filling the pool in proportion to the shares; admission then takes free slots
            for any chunk index.
    """

    def __init__(self, ratios: Sequence[float], enforce_ratio: float, fixed: bool = False) -> None:
        super().__init__(len(ratios), enforce_ratio)
        self.ratios = list(ratios)
        self.shares = chunk_shares(ratios)
        self.fixed = fixed

    def keep_fractions(self, capacity: int, num_seen: int) -> torch.Tensor:
        if self.fixed:
            return 1.0 - torch.tensor(self.ratios, dtype=torch.float64)
        return self._filled_pool_fractions(capacity, num_seen)

    def _filled_pool_fractions(self, capacity: int, num_seen: int) -> torch.Tensor:
        # Water-filling: chunk k targets capacity * share_k live chunks, at most num_seen; slots
        # a saturated chunk index cannot use go to the others in proportion to their shares.
        K = self.num_chunks
        if num_seen == 0:
            return torch.ones(K, dtype=torch.float64)
        target = torch.zeros(K, dtype=torch.float64)
        open_k = torch.ones(K, dtype=torch.bool)
        left = float(capacity)
        for _ in range(K):  # each pass saturates a chunk index or hands out every slot
            if left <= 1e-6 * capacity or not bool(open_k.any()):
                break
            give = left * self.shares * open_k / float((self.shares * open_k).sum())
            target = torch.minimum(target + give, torch.full_like(target, float(num_seen)))
            left = capacity - float(target.sum())
            open_k &= target < num_seen
        return target / num_seen

    def thresholds(self, sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [_quantile_threshold(sample[:, k], float(keep[k])) for k in range(self.num_chunks)]
        ).to(torch.float32)

    def admission_quota(self, capacity: int) -> List[int]:
        if self.fixed:
            return [capacity] * self.num_chunks
        # Largest remainder, so the quotas add up to the whole pool rather than losing slots.
        exact = [capacity * float(s) for s in self.shares]
        quota = [math.floor(x) for x in exact]
        # Rounded so float noise (0.35 / 0.4 = 0.87499...) does not break ties; ties favour chunk 0.
        by_remainder = sorted(range(len(exact)), key=lambda k: (round(quota[k] - exact[k], 9), k))
        for k in by_remainder[: capacity - sum(quota)]:
            quota[k] += 1
        return quota


class DynamicThresholdPolicy(ThresholdPolicy):
    """One global threshold over all chunk utilities; per-chunk occupancy follows utility."""

    def keep_fractions(self, capacity: int, num_seen: int) -> torch.Tensor:
        keep = min(1.0, capacity / max(1, num_seen * self.num_chunks))
        return torch.full((self.num_chunks,), keep, dtype=torch.float64)

    def thresholds(self, sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        thr = _quantile_threshold(sample.reshape(-1), float(keep[0]))
        return thr.expand(self.num_chunks).to(torch.float32).clone()

    def split_thresholds(self, sample: torch.Tensor, present: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
        # One threshold over every present chunk, keeping the slots' share of them.
        n = present.sum(0).to(torch.float64).clamp(min=1)
        overall = float((keep * n).sum() / n.sum())
        thr = _quantile_threshold(sample[present], overall)
        return thr.expand(self.num_chunks).to(torch.float32).clone()

    def admission_quota(self, capacity: int) -> List[int]:
        return [capacity] * self.num_chunks
