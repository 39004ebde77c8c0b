"""VHPI storage: entry tables (virtually hashed) and chunk pools (physically indexed)."""

from torchrec_fiited.store.chunk_pool import ChunkPool
from torchrec_fiited.store.dim_map import DimMap
from torchrec_fiited.store.entry_table import EntryTable
from torchrec_fiited.store.layout import NEVER_SEEN, PRUNED, hash_ids, live_from_mask, mask_from_live
from torchrec_fiited.store.vhpi import TableLayout, VHPIStore

__all__ = [
    "ChunkPool",
    "DimMap",
    "EntryTable",
    "NEVER_SEEN",
    "PRUNED",
    "TableLayout",
    "VHPIStore",
    "hash_ids",
    "live_from_mask",
    "mask_from_live",
]
