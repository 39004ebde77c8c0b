"""The fused-optimizer handle a sharded FIITED collection exposes to DMP.

Its keys and param_groups are the same on every rank (one entry per global table), so the
optimizer state_dict checkpoints with DCP like any replicated object; the per-chunk optimizer
state itself lives in the module's logical state_dict, where it is sharded with the rows.
"""

from typing import Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.fused import FusedOptimizer

from torchrec_fiited.optim import InBackwardOptimizer
from torchrec_fiited.store.logical import state_key


class ShardedFiitedOptimizer(InBackwardOptimizer):
    """Hyper-parameters (lr, eps, weight_decay, optimizer) for every local lookup of a rank.

    The lookups read ``param_groups[0]`` in backward, so LR schedulers on DMP's
    ``fused_optimizer`` act on every shard.

    Args:
        tables: the collection's tables; keys are ``embedding_bags.<table>.weight``.
        unsharded: the unsharded module's fused optimizer, whose hyper-parameters are copied.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], unsharded: FusedOptimizer) -> None:
        params: Dict[str, torch.Tensor] = {
            state_key(t.name, "weight"): torch.empty(0) for t in tables
        }
        group = {k: v for k, v in unsharded.param_groups[0].items() if k != "params"}
        group["params"] = list(params.values())
        super().__init__(params, {}, [group])
