"""Deterministic global batches, each cut into one contiguous slice per rank.

A *global* batch is ``B = train.batch_size`` consecutive examples of the epoch's order. Rank ``r``
of ``W`` takes rows ``[r * B/W, (r + 1) * B/W)`` of it, so the W ranks together see exactly the
batch that one process would. Example, B=8, W=2, time order::

    epoch order   0 1 2 3 4 5 6 7 | 8 9 10 11 12 13 14 15 | 16 17 18   (19 rows)
    rank 0        0 1 2 3         | 8 9 10 11             | dropped: a short last batch
    rank 1                4 5 6 7 |            12 13 14 15|   cannot be split evenly

The epoch order is a pure function of ``(seed, epoch)``: time order, or with ``shuffle`` a
permutation drawn from ``default_rng([seed, epoch])``. A resumed run rebuilds the order of its
epoch and skips the batches it already trained on, so it sees the same batches as an
uninterrupted run.

With more than one rank a short last training batch is always dropped: gloo's row-wise
all-to-all needs the same batch size on every rank. Test batches are padded instead (every test
example must be scored once): each rank's slice of a global test batch is padded to
``ceil(G / W)`` rows and the padding is masked out when the predictions are gathered.
"""

import math
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from torchrec_fiited.data.common import CTRArrays, make_batches


def _to_batch(arrays: CTRArrays, sparse_names: Sequence[str], device: Optional[torch.device]) -> Batch:
    batch = make_batches(arrays, len(arrays), sparse_names)[0]
    return batch if device is None or device.type == "cpu" else batch.to(device)


class TrainBatches:
    """One rank's training batches of every epoch.

    Args:
        arrays: the N training examples.
        sparse_names: KeyedJaggedTensor keys, one per sparse column.
        batch_size: global batch size B; each rank gets B / world_size rows of every batch.
        rank: this process's rank.
        world_size: number of ranks W.
        shuffle: a new seeded permutation of the examples every epoch (else time order).
        seed: seed of those permutations.
        drop_last: drop a short last batch (always done when W > 1).
        device: where the batches are put (None: CPU).

    Raises:
        ValueError: if B is not a multiple of W, or a rank would get no rows.
    """

    def __init__(self, arrays: CTRArrays, sparse_names: Sequence[str], batch_size: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, device: Optional[torch.device] = None) -> None:
        if batch_size % world_size != 0:
            fix = max(world_size, batch_size - batch_size % world_size)
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by the world size {world_size} "
                f"(each rank takes batch_size / world_size examples of every global batch); "
                f"use e.g. train.batch_size={fix}"
            )
        self.arrays = arrays
        self.sparse_names = list(sparse_names)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.drop_last = drop_last or world_size > 1
        self.device = device
        n = len(arrays)
        self._num_batches = n // batch_size if self.drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        """Batches (optimizer steps) per epoch."""
        return self._num_batches

    def order(self, epoch: int) -> np.ndarray:
        """int64 ``[N]``: the example order of ``epoch``."""
        n = len(self.arrays)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's slices of the global batches ``start, start+1, ...`` of ``epoch``."""
        rows = self.order(epoch)
        for b in range(start, len(self)):
            global_rows = rows[b * self.batch_size:(b + 1) * self.batch_size]
            lo = self.rank * self.local_batch_size
            # W == 1 keeps a short last batch whole; W > 1 never sees one (dropped).
            mine = global_rows[lo:lo + self.local_batch_size]
            yield _to_batch(self.arrays.take(mine), self.sparse_names, self.device)


def eval_batches(arrays: CTRArrays, sparse_names: Sequence[str], batch_size: int, rank: int = 0,
                 world_size: int = 1, device: Optional[torch.device] = None
                 ) -> Iterator[Tuple[Batch, int]]:
    """This rank's padded slices of the global test batches, with how many rows are real.

    Every rank yields the same number of batches of the same size (the collectives of a sharded
    forward need that); the real rows come first. Over all ranks the real rows are each test
    example exactly once.

    Yields:
        ``(batch, num_valid)``: ``batch`` has ``ceil(G / W)`` rows for a global batch of G; rows
        ``[0, num_valid)`` are this rank's share, the rest repeat the global batch's first row.
    """
    n = len(arrays)
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        per_rank = math.ceil(size / world_size)
        lo = start + min(rank * per_rank, size)
        hi = start + min((rank + 1) * per_rank, size)
        rows = np.arange(lo, hi)
        pad = np.full(per_rank - len(rows), start, dtype=rows.dtype)
        yield _to_batch(arrays.take(np.concatenate([rows, pad])), sparse_names, device), len(rows)
