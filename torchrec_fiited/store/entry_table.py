"""VHPI hash-table entries of one embedding table (see ``store.layout`` for the terms)."""

import torch
from torch import nn

from torchrec_fiited.store.layout import NEVER_SEEN, PRUNED


class EntryTable(nn.Module):
    """Per-entry chunk addresses, utilities, live mask and seen bookkeeping for one table.

    Bytes per entry: 4K (chunk_slots) + 4K (utilities) + 1 (live_mask) + 4 (last_step)
    = 8K + 5. "Seen" is ``last_step != NEVER_SEEN``: no separate list, so the O(seen) scans of a
    pruning cycle become O(E) scans, which every T steps cost far less than 4 bytes per row. The store never embeds policy logic; it is mutated only through
    ``VHPIStore`` so that slots, mask and pool counters stay consistent.

    Args:
        num_entries: E, entries of the table (its ``num_embeddings``).
        num_chunks: K.
        device: where the tensors live.
    """

    def __init__(self, num_entries: int, num_chunks: int, device: torch.device) -> None:
        super().__init__()
        self.num_entries = num_entries
        self.num_chunks = num_chunks
        self.register_buffer(
            "chunk_slots",
            torch.full((num_entries, num_chunks), PRUNED, dtype=torch.int32, device=device),
        )
        self.register_buffer("utilities", torch.zeros(num_entries, num_chunks, device=device))
        self.register_buffer("live_mask", torch.zeros(num_entries, dtype=torch.uint8, device=device))
        self.register_buffer(
            "last_step", torch.full((num_entries,), NEVER_SEEN, dtype=torch.int32, device=device)
        )
        self.register_buffer("num_seen", torch.tensor(0, dtype=torch.int64, device=device))
        # Last pruning cycle's counts, for stats().
        self.register_buffer("last_cycle_evictions", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("last_cycle_allocations", torch.tensor(0, dtype=torch.int64, device=device))

    def seen(self) -> torch.Tensor:
        """Entries seen in training so far, int64 [num_seen], ascending."""
        return (self.last_step != NEVER_SEEN).nonzero().squeeze(1)

    def mark_seen(self, entries: torch.Tensor, step: int) -> torch.Tensor:
        """Record first sightings among ``entries`` (unique int64 [n]); returns the new ones."""
        new = entries[self.last_step[entries] == NEVER_SEEN]
        if new.numel():
            self.num_seen += new.numel()
            # Utilities of a never-seen entry are 0, so stamping the step loses nothing.
            self.last_step[new] = step
        return new
