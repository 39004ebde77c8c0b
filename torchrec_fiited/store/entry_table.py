"""The resident entries of one pool: a hash table from keys to entries, and each entry's chunks.

Store v2 (issue 11): an entry exists only for a resident key, so these tensors scale with the
budget, not with ``num_embeddings``. Terms are ``store.layout``'s.
"""

import math
from typing import Optional

import torch
from torch import nn

from torchrec_fiited.ops.hash_reference import EMPTY_KEY
from torchrec_fiited.store import memory
from torchrec_fiited.store.hash_table import ResidentHashTable
from torchrec_fiited.store.layout import PRUNED

# A rebase is due when an addition's scale gamma^(base - step) would pass this: stored utilities
# stay far inside fp32's range whatever the decay and the pruning interval.
_MAX_LOG_SCALE = 32 * math.log(2)


class EntryTable(nn.Module):
    """Hash index plus per-entry chunk addresses, utilities and decay bookkeeping for one pool.

    ``index`` maps a key to an entry in [0, S); entry S (``null_entry``) is what every
    non-resident key resolves to: it holds no chunk, so it reads as zeros, and the backward
    skips it (its ids are scored for the sketch instead). Bytes per entry slot:
    8 (key) + 4 (score) + 2K or 4K (chunk_slots: int16 in a pool of at most 2^15 slots) +
    4K (utilities) = 6K + 12 or 8K + 12, plus the null entry, the last thresholds, the utility
    base and three counters per pool.

    Utilities are stored against one base step for the whole table (``utility_base``), not a
    step per entry: the true utility of chunk k of entry e at step t is
    ``utilities[e, k] * gamma ** (t - utility_base)``. A pruning cycle (and an addition whose
    scale would grow past 2^32) rebases: one multiply over the table, cheaper than 4 bytes per
    entry (a tenth of a K=2 entry).

    An entry is resident iff its key is in ``index``; a free entry holds no chunk and zero
    utilities. The store mutates it only through ``VHPIStore`` so that keys, slots and pool
    counters stay consistent.

    Args:
        num_buckets: buckets of the hash index.
        bucket_size: W, slots per bucket (a power of two in [8, 128]).
        num_chunks: K.
        device: where the tensors live.
        decay: gamma in (0, 1], the utilities' decay per step.
        slots_dtype: of ``chunk_slots``: the pool's ``layout.slot_dtype``.
    """

    def __init__(self, num_buckets: int, bucket_size: int, num_chunks: int, device: torch.device,
                 decay: float = 1.0, slots_dtype: torch.dtype = torch.int32) -> None:
        super().__init__()
        self.decay = float(decay)
        self.index = ResidentHashTable(num_buckets, bucket_size, device)
        S = self.index.capacity
        self.num_chunks = num_chunks
        self.register_buffer(
            "chunk_slots", memory.full((S + 1, num_chunks), PRUNED, dtype=slots_dtype, device=device)
        )
        self.register_buffer("utilities", memory.zeros((S + 1, num_chunks), device=device))
        self.register_buffer("utility_base", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("num_seen", torch.tensor(0, dtype=torch.int64, device=device))
        # Last pruning cycle's thresholds: the bar an admitted id's estimate must clear to get a
        # chunk before the next cycle (0 until the first cycle: first touch takes free slots).
        self.register_buffer("thresholds", torch.zeros(num_chunks, device=device))
        # Last pruning cycle's counts, for stats().
        self.register_buffer("last_cycle_evictions", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("last_cycle_allocations", torch.tensor(0, dtype=torch.int64, device=device))

    @property
    def capacity(self) -> int:
        """S, entries the pool can hold."""
        return self.index.capacity

    @property
    def null_entry(self) -> int:
        return self.index.capacity

    def lookup(self, keys: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Entry int64 [n] of each key of ``keys`` int64 [n]; ``null_entry`` where not resident
        (written into ``out`` int64 [n] when given)."""
        return self.index.lookup_entry_keys(keys, missing=self.null_entry, out=out)

    def seen(self) -> torch.Tensor:
        """Resident entries, int64 [num_seen], ascending."""
        return (self.index.keys != EMPTY_KEY).nonzero().squeeze(1)

    # ---- utilities against the base step ------------------------------------------------------

    def utilities_at(self, entries: torch.Tensor, step: int) -> torch.Tensor:
        """True utilities fp32 [n, K] of ``entries`` int64 [n] at ``step``."""
        return self.utilities[entries] * self.decay ** (step - int(self.utility_base))

    def set_utilities(self, entries: torch.Tensor, values: torch.Tensor, as_of) -> None:
        """Make the utilities of ``entries`` be ``values`` fp32 [n, K] as of step ``as_of`` (an
        int, or int [n] per entry: a logical form's ``last_step``)."""
        age = torch.as_tensor(as_of, device=values.device).to(torch.float64) - int(self.utility_base)
        scale = torch.pow(self.decay, -age).to(torch.float32)
        if scale.dim():
            scale = scale.unsqueeze(-1)
        self.utilities[entries] = values.to(self.utilities) * scale

    def addition_scale(self, step: int) -> float:
        """gamma^(base - step): what an addition at ``step`` is stored as (``ops.fused_backward``'s
        ``utility_scale``). Rebases first if it would pass 2^32."""
        if self.decay != 1.0 and (step - int(self.utility_base)) * -math.log(self.decay) > _MAX_LOG_SCALE:
            self.rebase(step)
        return self.decay ** (int(self.utility_base) - step)

    def rebase(self, step: int) -> None:
        """Store the utilities as of ``step`` (every entry times gamma^(step - base))."""
        age = step - int(self.utility_base)
        if age != 0 and self.decay != 1.0:
            self.utilities.mul_(self.decay**age)
        self.utility_base.fill_(step)

    def keys_of(self, entries: torch.Tensor) -> torch.Tensor:
        """Key int64 [n] of each resident entry of ``entries`` int64 [n]."""
        return self.index.keys[entries]
