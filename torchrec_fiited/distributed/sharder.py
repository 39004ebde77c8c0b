"""FiitedEmbeddingBagCollectionSharder: lets DistributedModelParallel and the planner shard a
``FiitedEmbeddingBagCollection`` table-wise, row-wise or column-wise (by whole chunks)."""

from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, EmbeddingComputeKernel
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)

from torchrec_fiited.distributed.sharded_ebc import ShardedFiitedEmbeddingBagCollection
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
]


class FiitedEmbeddingBagCollectionSharder(BaseEmbeddingSharder[FiitedEmbeddingBagCollection]):
    """Sharder for ``FiitedEmbeddingBagCollection``.

    The planner sees each table as a dense ``[num_embeddings, embedding_dim]`` meta tensor (its
    logical shape, which fixes shard offsets and communication sizes) and the ``"fused"`` kernel;
    ``make_fiited_planner`` charges the memory a FIITED shard really holds. Row-wise is offered
    on CPU too (TorchRec's own sharders offer it only on CUDA), and column-wise shards must hold
    whole chunks.
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params, qcomm_codecs_registry)

    def shard(
        self,
        module: FiitedEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedFiitedEmbeddingBagCollection:
        return ShardedFiitedEmbeddingBagCollection(
            module, dict(params), env, device, self.qcomm_codecs_registry, module_fqn
        )

    def shardable_parameters(self, module: FiitedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        # Meta tensors of the logical shape: the planner reads shapes and dtypes, never data.
        return {
            t.name: nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device="meta"))
            for t in module.embedding_bag_configs()
        }

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        # Informational: the sharded module owns its kernel; "fused" is what the planner's
        # perf model knows on every device.
        return [EmbeddingComputeKernel.FUSED.value]

    @property
    def module_type(self):
        return FiitedEmbeddingBagCollection
