"""Per-chunk pruning ratios for manual mode: the paper's capped power-law fit."""

from typing import List, Sequence

import torch


def fit_chunk_prune_ratios(
    num_chunks: int, mean_ratio: float, exponent: float, cap: float
) -> List[float]:
    """Fit p_k = c * x_k ** exponent at x_k = (k + 0.5) / K so that mean(p) = ``mean_ratio``.

    Ratios grow with the chunk index: chunk 0 (the head of every row) is pruned least. A ratio
    above ``cap`` is fixed at ``cap`` and c is refitted over the remaining chunks, repeatedly,
    as in the paper (section IV-D). When ``mean_ratio > cap`` no fit can reach the mean and every
    chunk sits at the cap; the pool size still enforces the budget.

    Example:
        >>> fit_chunk_prune_ratios(2, 0.5, 1.0, 0.95)
        [0.25, 0.75]
    """
    x = [(k + 0.5) / num_chunks for k in range(num_chunks)]
    ratios = [0.0] * num_chunks
    capped = set()
    while True:
        free = [k for k in range(num_chunks) if k not in capped]
        if not free:
            return ratios
        remaining = num_chunks * mean_ratio - cap * len(capped)
        c = remaining / sum(x[k] ** exponent for k in free)
        over = [k for k in free if c * x[k] ** exponent > cap]
        if not over:
            for k in free:
                ratios[k] = c * x[k] ** exponent
            return ratios
        for k in over:
            ratios[k] = cap
            capped.add(k)


def chunk_shares(ratios: Sequence[float]) -> torch.Tensor:
    """Each chunk index's share of a pool's slots, proportional to 1 - p_k (fp64 [K])."""
    keep = torch.tensor([1.0 - r for r in ratios], dtype=torch.float64)
    return keep / keep.sum()
