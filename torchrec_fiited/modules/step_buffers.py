"""Per-id buffers of the training step, reused from one step to the next.

A training step writes a few int64 tensors with one value per id of the batch: the store keys,
the probed entries, the backward's entry codes and the gradient row of each id. At 4.26M ids
(26 features, batch 8192, L=20) each is 34 MB, above glibc's largest mmap threshold (32 MB), so a
fresh one is a fresh mapping: ~8k page faults and 34 MB zeroed by the kernel, ~7 ms on the
development machine, more than the hash probe that fills it spends reading the table
(bench_lookup --mixed: 4.26M probes in 31 ms with a fresh output, 24 ms into a used one).

Ownership is what makes reuse safe: a buffer taken for a batch returns only when the backward
that used the batch has finished with it (``recycle``). A batch whose backward never runs (eval,
a graph dropped before backward, a second forward before the first backward) simply keeps its
buffers, which are freed as any tensor; the next step then allocates afresh.
"""

from typing import List

import torch

# A buffer is allocated this much larger than asked, so that batches whose id count wanders a
# little (jagged features) keep reusing it.
_SLACK = 1.125


class StepBuffers:
    """A free list of 1-D buffers; ``take`` hands out a view of a free one (or a new one)."""

    def __init__(self) -> None:
        self._free: List[torch.Tensor] = []

    def take(self, n: int, dtype: torch.dtype, device: torch.device, owner: List[torch.Tensor]):
        """A contiguous ``dtype`` tensor [n] on ``device`` (contents unspecified). Its buffer is
        appended to ``owner`` (the batch's list), to come back by ``recycle``."""
        best = None
        for i, buf in enumerate(self._free):
            if buf.dtype == dtype and buf.device == device and buf.numel() >= n and (
                best is None or buf.numel() < self._free[best].numel()
            ):
                best = i
        if best is None:
            buf = torch.empty(max(1, int(n * _SLACK)), dtype=dtype, device=device)
        else:
            buf = self._free.pop(best)
        owner.append(buf)
        return buf[:n]

    def recycle(self, owned: List[torch.Tensor]) -> None:
        """Take back the buffers of a batch whose last use has finished. They become the free
        list; buffers still free then were not needed by that step and are dropped (outgrown or
        surplus), so what is held is at most one step's worth."""
        self._free = list(owned)
        owned.clear()

    def clear(self) -> None:
        self._free.clear()

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._free)
