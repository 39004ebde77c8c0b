"""Data layer: dataset readers, a synthetic generator and batching into torchrec batches.

Entry point: :func:`torchrec_fiited.data.registry.load_dataset`.
"""

from torchrec_fiited.data.common import (
    MISSING_ID,
    CTRArrays,
    DatasetSpec,
    hash_sizes_from_cardinalities,
    make_batches,
)
from torchrec_fiited.data.registry import SUPPORTED_DATASETS, load_dataset
from torchrec_fiited.data.synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "MISSING_ID",
    "CTRArrays",
    "DatasetSpec",
    "SUPPORTED_DATASETS",
    "SyntheticConfig",
    "hash_sizes_from_cardinalities",
    "load_dataset",
    "make_batches",
    "make_synthetic",
]
