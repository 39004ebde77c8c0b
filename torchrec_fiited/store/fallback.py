"""A small shared embedding per table for ids without an entry (``miss="hashed"``).

CAFE (SIGMOD'24) gives its cold ids a shared hashed embedding so that they still carry signal;
here it is optional (the paper reads zeros) and sized from the budget (``store.sizing``). It is
trained by the collection's fused optimizer (same rule and hyper-parameters as the pools, with
rowwise state per fallback row).

The hash is the row-wise shards' own: an id's fallback bucket is ``row_permutation(row, E) //
width``, a block of the permuted id space (``FallbackGrid``). A row-wise shard owns a range of
that space, so it holds a contiguous run of the table's buckets, and the fallback is one
function of the id under every plan and world size: a checkpoint reshards it bucket by bucket
(``distributed/reshard.py``). A bucket cut by a shard boundary lives on both shards; their
gradients are summed across ranks each step (``edge_contribution`` / ``flush``), so the copies
stay equal and the table trains as one.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_fiited.ops import dispatch
from torchrec_fiited.ops.reference import FusedParams, sparse_update
from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES
from torchrec_fiited.store.layout import counter_uniform, key_row

_FALLBACK_SALT = 0x7F4A7C159E3779B9


def bucket_width(num_rows: int, buckets: int) -> int:
    """Permuted rows per bucket for about ``buckets`` buckets over an id space of ``num_rows``
    (0: no fallback). The table then has ``ceil(num_rows / width) <= buckets`` buckets."""
    return math.ceil(num_rows / buckets) if buckets > 0 else 0


@dataclass(frozen=True)
class FallbackGrid:
    """The buckets a table's (shard's) fallback holds.

    Args:
        id_space: E, the table's rows (``num_embeddings``).
        width: permuted rows per bucket (``bucket_width``), the same for every shard of a table.
        lo, hi: the permuted rows [lo, hi) this shard holds (its hash range; [0, E) if whole).
    """

    id_space: int
    width: int
    lo: int
    hi: int

    @property
    def first(self) -> int:
        """Global index of the first bucket held."""
        return self.lo // self.width if self.width > 0 else 0

    @property
    def rows(self) -> int:
        """Buckets held: every one that meets [lo, hi)."""
        return 0 if self.width <= 0 or self.hi <= self.lo else (self.hi - 1) // self.width - self.first + 1

    @property
    def split(self) -> bool:
        """Whether a bucket reaches outside [lo, hi) (the table's rows are split over shards)."""
        return self.rows > 0 and (self.lo > 0 or self.hi < self.id_space)


class HashedFallback(nn.Module):
    """The fallback rows fp32 [rows, D] of one table or shard (``grid``), read by
    ``row_permutation(key_row(key), E) // width - first``.

    ``grid.rows == 0`` holds nothing and reads zeros. Initialised like the table (uniform in its
    init range, from the counter generator keyed by the global bucket and column, so a shard
    starts with its part of the unsharded fallback).

    Args:
        grid: which buckets it holds.
        dim: D (of this shard's columns).
        optimizer: the pools' optimizer ("sgd", "adagrad", "rowwise_adagrad").
        init: (low, high) of the uniform initialisation.
        seed: key of the initial values.
        device: where the tensors live.
        col_offset: the table column of its column 0 (column shards).
    """

    def __init__(self, grid: FallbackGrid, dim: int, optimizer: str, init, seed: int,
                 device: torch.device, col_offset: int = 0) -> None:
        super().__init__()
        self.grid = grid
        self.rows = grid.rows
        # Drawn on the CPU whatever the default device: a collection built under
        # ``torch.device("meta")`` (planning) still gets real values, as its pools do.
        with torch.device("cpu"):
            bucket = torch.arange(grid.first, grid.first + self.rows, dtype=torch.int64).unsqueeze(1)
            cols = torch.arange(col_offset, col_offset + dim, dtype=torch.int64)
            u = counter_uniform([seed, _FALLBACK_SALT, bucket, cols]) if self.rows else torch.zeros(0, dim)
        self.register_buffer("weights", (init[0] + (init[1] - init[0]) * u).to(device))
        self.register_buffer(
            "momentum", torch.zeros(OPTIMIZER_STATE_SHAPES[optimizer](self.rows, dim), device=device)
        )
        # (fallback rows, per-id gradients) of this step, applied at ``flush``; their sum per
        # row once computed (``_summed``: read by ``edge_contribution``, then by ``flush``).
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._sum: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Fallback row int64 [n] of each key (keys of this shard's ids)."""
        if self.rows == 0:
            return torch.zeros_like(keys)
        g = self.grid
        permuted = dispatch.row_permutation(key_row(keys), [0, keys.numel()], [g.id_space], [0],
                                            inverse=False)
        return torch.div(permuted, g.width, rounding_mode="floor") - g.first

    def pooled(self, keys, miss, offsets, per_sample_weights, mean: bool) -> torch.Tensor:
        """fp32 [B, D]: the bags' sums (means) of fallback rows over the ids with ``miss`` set."""
        w = miss.to(self.weights.dtype)
        if per_sample_weights is not None:
            w = w * per_sample_weights
        out = F.embedding_bag(
            self.rows_of(keys), self.weights, offsets, mode="sum", per_sample_weights=w,
            include_last_offset=True,
        )
        if mean:
            out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).to(out.dtype).unsqueeze(1)
        return out

    def accumulate(self, keys: torch.Tensor, grads: torch.Tensor) -> None:
        """Record per-id gradients ``grads`` fp32 [n, D] of missing ``keys`` for ``flush``."""
        if self.rows and keys.numel():
            self._pending.append((self.rows_of(keys), grads))
            self._sum = None

    def _summed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(distinct rows int64 [r], their summed gradients fp32 [r, D]) of the pending ids."""
        if self._sum is None:
            if not self._pending:
                self._sum = (torch.empty(0, dtype=torch.int64, device=self.weights.device),
                             self.weights.new_zeros(0, self.weights.shape[1]))
            else:
                rows = torch.cat([r for r, _ in self._pending])
                grads = torch.cat([g for _, g in self._pending])
                rows, inverse = torch.unique(rows, return_inverse=True)
                self._sum = (rows, grads.new_zeros(rows.numel(), grads.shape[1]).index_add_(
                    0, inverse, grads))
        return self._sum

    def _edges(self) -> List[int]:
        """Local rows of the edge buckets (first and last held; one where they coincide)."""
        return sorted({0, self.rows - 1})

    @staticmethod
    def no_edges(dim: int) -> torch.Tensor:
        """An ``edge_contribution`` naming no bucket (-1): a shard holding no rows."""
        out = torch.zeros(2, 2 + dim, dtype=torch.float64)
        out[:, 0] = -1
        return out

    def edge_contribution(self) -> torch.Tensor:
        """fp64 [2, 2 + D]: per edge bucket (first, last held), its global index, whether this
        shard's ids touched it this step, and their summed gradient (the last row is absent, -1,
        where first and last are one bucket)."""
        out = self.no_edges(self.weights.shape[1])
        if self.rows == 0:
            return out
        rows, summed = self._summed()
        for side, local in enumerate(self._edges()):
            out[side, 0] = self.grid.first + local
            hit = (rows == local).nonzero().flatten()
            if hit.numel():
                out[side, 1] = 1
                out[side, 2:] = summed[hit[0]].to(torch.float64).cpu()
        return out

    def flush(self, params: FusedParams, every_edge: Optional[torch.Tensor] = None) -> None:
        """One optimizer step per touched fallback row with its summed gradient, then clear.

        Args:
            every_edge: with split rows, every shard's ``edge_contribution`` of this table
                fp64 [shards, 2, 2 + D] (same order on every rank): an edge bucket then steps
                with the sum over every shard that touched it, so its copies stay equal.
        """
        rows, summed = self._summed()
        self._pending.clear()
        self._sum = None
        if every_edge is not None and self.rows:
            edges = self._edges()
            keep = ~torch.isin(rows, torch.tensor(edges, device=rows.device))
            rows, summed = rows[keep], summed[keep]
            flat = every_edge.reshape(-1, every_edge.shape[-1])
            for local in edges:
                mine = flat[(flat[:, 0] == self.grid.first + local) & (flat[:, 1] > 0)]
                if mine.shape[0]:
                    total = mine[:, 2:].sum(0).to(summed.dtype).to(summed.device)
                    rows = torch.cat([rows, torch.tensor([local], device=rows.device)])
                    summed = torch.cat([summed, total.unsqueeze(0)])
        sparse_update(self.weights, self.momentum, rows, summed, params)

    def update(self, keys: torch.Tensor, grads: torch.Tensor, params: FusedParams) -> None:
        """``accumulate`` then ``flush``: one optimizer step from these ids alone."""
        self.accumulate(keys, grads)
        self.flush(params)
