"""VHPI storage: resident entries (virtually hashed), chunk pools (physically indexed), the
utility sketch and hashed fallback for the other ids, and the byte model that sizes them."""

from torchrec_fiited.store.chunk_pool import ChunkPool
from torchrec_fiited.store.dim_map import DimMap
from torchrec_fiited.store.entry_table import EntryTable
from torchrec_fiited.store.fallback import HashedFallback
from torchrec_fiited.store.hash_table import ResidentHashTable
from torchrec_fiited.store.layout import (
    NEVER_SEEN,
    PRUNED,
    entry_key,
    hash_ids,
    row_permutation,
    key_row,
    key_table,
)
from torchrec_fiited.store.sizing import PoolSizes, TableSpec, pool_bytes, size_pool
from torchrec_fiited.store.sketch import UtilitySketch
from torchrec_fiited.store.vhpi import TableLayout, VHPIStore

__all__ = [
    "ChunkPool",
    "DimMap",
    "EntryTable",
    "HashedFallback",
    "NEVER_SEEN",
    "PRUNED",
    "PoolSizes",
    "ResidentHashTable",
    "TableLayout",
    "TableSpec",
    "UtilitySketch",
    "VHPIStore",
    "entry_key",
    "hash_ids",
    "row_permutation",
    "key_row",
    "key_table",
    "pool_bytes",
    "size_pool",
]
