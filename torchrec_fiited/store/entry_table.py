"""The resident entries of one pool: a hash table from keys to entries, and each entry's chunks.

Store v2 (issue 11): an entry exists only for a resident key, so these tensors scale with the
budget, not with ``num_embeddings``. Terms are ``store.layout``'s.
"""

import torch
from torch import nn

from torchrec_fiited.store.hash_table import ResidentHashTable
from torchrec_fiited.store.layout import NEVER_SEEN, PRUNED


class EntryTable(nn.Module):
    """Hash index plus per-entry chunk addresses, utilities and decay bookkeeping for one pool.

    ``index`` maps a key to an entry in [0, S); entry S (``null_entry``) is what every
    non-resident key resolves to: it holds no chunk, so it reads as zeros, and the backward
    skips it (its ids are scored for the sketch instead). Bytes per entry slot:
    8 (key) + 4 (score) + 4K (chunk_slots) + 4K (utilities) + 4 (last_step) = 8K + 16,
    plus the null entry, the last thresholds and three counters per pool.

    An entry is resident iff ``last_step != NEVER_SEEN`` iff its key is in ``index``. The store
    mutates it only through ``VHPIStore`` so that keys, slots and pool counters stay consistent.

    Args:
        num_buckets: buckets of the hash index.
        bucket_size: W, slots per bucket (a power of two in [8, 128]).
        num_chunks: K.
        device: where the tensors live.
    """

    def __init__(self, num_buckets: int, bucket_size: int, num_chunks: int, device: torch.device) -> None:
        super().__init__()
        self.index = ResidentHashTable(num_buckets, bucket_size, device)
        S = self.index.capacity
        self.num_chunks = num_chunks
        self.register_buffer(
            "chunk_slots", torch.full((S + 1, num_chunks), PRUNED, dtype=torch.int32, device=device)
        )
        self.register_buffer("utilities", torch.zeros(S + 1, num_chunks, device=device))
        self.register_buffer(
            "last_step", torch.full((S + 1,), NEVER_SEEN, dtype=torch.int32, device=device)
        )
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

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Entry int64 [n] of each key of ``keys`` int64 [n]; ``null_entry`` where not resident."""
        return self.index.lookup_entry_keys(keys, missing=self.null_entry)

    def seen(self) -> torch.Tensor:
        """Resident entries, int64 [num_seen], ascending."""
        return (self.last_step[:-1] != NEVER_SEEN).nonzero().squeeze(1)

    def keys_of(self, entries: torch.Tensor) -> torch.Tensor:
        """Key int64 [n] of each resident entry of ``entries`` int64 [n]."""
        return self.index.keys[entries]
