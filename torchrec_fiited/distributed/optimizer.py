"""The fused-optimizer handle a sharded FIITED collection exposes to DMP.

Its keys and param_groups are the same on every rank (one entry per global table), so the
optimizer state_dict checkpoints with DCP like any replicated object; the per-chunk optimizer
state itself lives in the module's logical state_dict, where it is sharded with the rows.
"""

from typing import Any, Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.fused import FusedOptimizer


class ShardedFiitedOptimizer(FusedOptimizer):
    """Hyper-parameters (lr, eps, weight_decay, optimizer) for every local lookup of a rank.

    The lookups read ``param_groups[0]`` in backward, so LR schedulers on DMP's
    ``fused_optimizer`` act on every shard.

    Args:
        tables: the collection's tables; keys are ``embedding_bags.<table>.weight``.
        unsharded: the unsharded module's fused optimizer, whose hyper-parameters are copied.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], unsharded: FusedOptimizer) -> None:
        params: Dict[str, torch.Tensor] = {
            f"embedding_bags.{t.name}.weight": torch.empty(0) for t in tables
        }
        group = {k: v for k, v in unsharded.param_groups[0].items() if k != "params"}
        group["params"] = list(params.values())
        super().__init__(params, {}, [group])

    def step(self, closure: Any = None) -> None:
        """No-op: the update already happened in backward with the current ``param_groups``."""
        return None

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: fused updates leave no gradients behind."""
        return None
