"""Per-id buffers of the training step, reused from one step to the next.

A training step writes a few int64 tensors with one value per id of the batch: the store keys,
the probed entries, the backward's entry codes and the gradient row of each id. At 4.26M ids
(26 features, batch 8192, L=20) each is 34 MB, above glibc's largest mmap threshold (32 MB), so a
fresh one is a fresh mapping: ~8k page faults and 34 MB zeroed by the kernel, ~7 ms on the
development machine, more than the hash probe that fills it spends reading the table
(bench_lookup --mixed: 4.26M probes in 31 ms with a fresh output, 24 ms into a used one).

Ownership is what makes reuse safe: a buffer taken for a batch returns only when the last reader
of the batch has finished with it (``recycle``): a training step's backward, or an inference
forward once its lookup is done. A batch whose backward never runs (a graph dropped before
backward, a second forward before the first backward) simply keeps its buffers, which are freed
as any tensor; the next step then allocates afresh.

The pooled output [B, sum D] (54 MB at 26 x 64 columns, batch 8192) leaves the module, so no
backward of ours can say when it is dead; ``output`` reuses it only when no tensor anywhere (the
caller's, autograd's saved ones) still holds its storage: -14 ms a step in one process, A/B
against a fresh output (bench_lookup --mixed, L=20, budget 0.25).
"""

from typing import List, Optional, Sequence

import torch


def _storage_holders(t: torch.Tensor) -> Optional[int]:
    """Tensors holding ``t``'s storage (+1 for the storage object this call makes), or None
    where torch does not expose the count (no reuse then)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else int(use_count(t.untyped_storage()._cdata))

# A buffer is allocated this much larger than asked, so that batches whose id count wanders a
# little (jagged features) keep reusing it.
_SLACK = 1.125


class StepBuffers:
    """A free list of 1-D buffers; ``take`` hands out a view of a free one (or a new one)."""

    def __init__(self) -> None:
        self._free: List[torch.Tensor] = []
        self._output: Optional[torch.Tensor] = None
        self._output_alone: Optional[int] = None  # _storage_holders of it when only we hold it

    def output(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        """A contiguous ``dtype`` tensor of ``shape`` (contents unspecified): the last one handed
        out when nothing but this object still holds it, else a new one. Not a view in
        autograd's sense (a fresh tensor on the same storage), so callers may modify it in
        place as they could a fresh one."""
        shape = tuple(shape)
        buf = self._output
        if (buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device
                or self._output_alone is None or _storage_holders(buf) != self._output_alone):
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._output, self._output_alone = buf, _storage_holders(buf)
        return torch.empty(0, dtype=dtype, device=device).set_(buf.untyped_storage(), 0, shape)

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

    def lease(self) -> "Lease":
        """What one batch takes from here, to give back in one ``Lease.release``."""
        return Lease(self)

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._free)


class Lease:
    """The buffers one batch has taken from a ``StepBuffers`` (shared by the batch's pools)."""

    def __init__(self, buffers: StepBuffers) -> None:
        self._buffers = buffers
        self._owned: List[torch.Tensor] = []

    def per_id(self, n: int, device: torch.device) -> torch.Tensor:
        """An int64 [n] tensor (contents unspecified), reused from an earlier batch if one fits."""
        return self._buffers.take(n, torch.int64, device, self._owned)

    def output(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device):
        """``StepBuffers.output``: the last output's storage when nothing holds it any more."""
        return self._buffers.output(shape, dtype, device)

    def release(self) -> None:
        """Give every buffer taken back; the batch's per-id tensors are then overwritten by the
        next batch's."""
        self._buffers.recycle(self._owned)


def per_id(n: int, device: torch.device, lease: Optional[Lease]) -> torch.Tensor:
    """int64 [n] on ``device``: from ``lease`` when given, else fresh."""
    if lease is None:
        return torch.empty(n, dtype=torch.int64, device=device)
    return lease.per_id(n, device)
