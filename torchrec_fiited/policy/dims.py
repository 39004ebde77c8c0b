"""FIITED-2D policy: per-dimension utilities, when to decide, and which columns to keep.

The paper (III-B, "2D pruning") scores a dimension by the squared gradient sum of all entries
on it, prunes after a cold start at full width, and notes that hot dimensions stay hot, so
decisions are rare. Here the gradient is the pooled-output one, which exists for pruned
dimensions too (the model still differentiates through their zeros), so a revisit can bring a
dimension back.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping

import torch

from torchrec_fiited.config import DimPruningConfig


def record_dim_utilities(utilities: torch.Tensor, grad_rows: torch.Tensor, decay: float) -> None:
    """u = decay * u + sum_r grad_rows[r] ** 2, in place.

    Args:
        utilities: fp32 [K, chunk_size], one per column of the table's rows.
        grad_rows: fp32 [R, D], pooled-output gradients of the table's bags (all columns).
        decay: gamma in (0, 1].
    """
    squares = grad_rows.pow(2).sum(0).view_as(utilities)
    if decay != 1.0:
        utilities.mul_(decay)
    utilities.add_(squares)


def decision_due(steps_done: int, cfg: DimPruningConfig) -> bool:
    """Whether a decision runs after training step number ``steps_done`` (1-based): at the end
    of the cold start, then every ``revisit_interval`` steps (if any)."""
    if not cfg.enabled or steps_done < cfg.cold_start_steps:
        return False
    since = steps_done - cfg.cold_start_steps
    return since == 0 or (cfg.revisit_interval > 0 and since % cfg.revisit_interval == 0)


def kept_width(chunk_size: int, target_ratio: float) -> int:
    """cs' = ceil((1 - target_ratio) * chunk_size), at least 1: never prunes more than the target."""
    # The epsilon keeps e.g. (1 - 0.5) * 8 from ceiling to 5 through float noise.
    return max(1, math.ceil((1.0 - target_ratio) * chunk_size - 1e-9))


def top_columns(utilities: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` highest-utility columns of each chunk, int64 [K, width], ascending.

    Ties go to the lower column (stable sort), so a decision is reproducible.
    """
    order = torch.sort(utilities, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :width], dim=1).values


@dataclass
class PoolColumns:
    """What the global scope needs to know about one pool.

    Args:
        utilities: per table of the pool, fp32 [K, chunk_size].
        capacity: slots; one more stored column per chunk costs this many floats.
        chunk_size: columns per chunk.
    """

    utilities: List[torch.Tensor]
    capacity: int
    chunk_size: int


def global_widths(pools: Mapping[str, PoolColumns], target_ratio: float) -> Dict[str, int]:
    """Widths per pool pruning at most ``target_ratio`` of all pools' column bytes.

    Keeping column rank j of a pool (each table's j-th best column of every chunk) gains the
    utility of those columns and costs ``capacity`` floats. Every pool keeps rank 0; then
    ranks are kept by gain per float, highest first, until the kept floats reach
    (1 - target_ratio) of the total. Gains fall with j within a pool, so each pool keeps a
    prefix of its ranks.
    """
    total = sum(p.capacity * p.chunk_size for p in pools.values())
    kept = sum(p.capacity for p in pools.values())
    widths = {name: 1 for name in pools}
    scores, owners = [], []
    for name, p in pools.items():
        ranked = torch.stack([torch.sort(u, dim=1, descending=True).values for u in p.utilities])
        gain = ranked.sum(dim=(0, 1))[1:]  # [chunk_size - 1]: ranks 1.. summed over tables, chunks
        scores.append(gain.double().cpu() / p.capacity)
        owners += [name] * gain.numel()
    if not owners:
        return widths
    order = torch.sort(torch.cat(scores), descending=True, stable=True).indices.tolist()
    for i in order:
        if kept >= (1.0 - target_ratio) * total - 1e-9:
            break
        widths[owners[i]] += 1
        kept += pools[owners[i]].capacity
    return widths


__all__ = [
    "PoolColumns",
    "decision_due",
    "global_widths",
    "kept_width",
    "record_dim_utilities",
    "top_columns",
]
