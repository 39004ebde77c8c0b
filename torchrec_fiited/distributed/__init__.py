"""Distributed FIITED: sharder, sharded module, coordinated pruning and planning for DMP."""

from typing import List

from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder

from torchrec_fiited.distributed.gather import (
    gather_state_dict,
    gather_unsharded,
    load_logical_tables,
    logical_tables,
)
from torchrec_fiited.distributed.planner import (
    FiitedStorageEstimator,
    fiited_shard_bytes,
    make_fiited_planner,
)
from torchrec_fiited.distributed.reshard import load_resharded
from torchrec_fiited.distributed.sharded_ebc import ShardedFiitedEmbeddingBagCollection
from torchrec_fiited.distributed.sharder import FiitedEmbeddingBagCollectionSharder


def fiited_sharders() -> List[ModuleSharder]:
    """TorchRec's default sharders plus the FIITED one (DMP replaces its defaults when given
    ``sharders=``, so pass this list)."""
    return list(get_default_sharders()) + [FiitedEmbeddingBagCollectionSharder()]


__all__ = [
    "FiitedEmbeddingBagCollectionSharder",
    "FiitedStorageEstimator",
    "ShardedFiitedEmbeddingBagCollection",
    "fiited_shard_bytes",
    "fiited_sharders",
    "gather_state_dict",
    "gather_unsharded",
    "load_logical_tables",
    "load_resharded",
    "logical_tables",
    "make_fiited_planner",
]
