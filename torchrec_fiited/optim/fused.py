"""The fused optimizer handle: a TorchRec KeyedOptimizer over the chunk pools.

The update itself runs inside backward (``FiitedEmbeddingBagCollection``), reading its
hyper-parameters from ``param_groups[0]`` at that moment, so LR schedulers and
``CombinedOptimizer`` work as with TorchRec's fused EBC; ``step`` has nothing left to do.
"""

from typing import Any, Dict, Mapping

import torch
from torchrec.optim.fused import FusedOptimizer

from torchrec_fiited.store.chunk_pool import ChunkPool


class InBackwardOptimizer(FusedOptimizer):
    """A handle whose updates already ran in backward: ``step`` and ``zero_grad`` do nothing."""

    def step(self, closure: Any = None) -> None:
        """No-op: the update already happened in backward with the current ``param_groups``."""
        return None

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: fused updates leave no gradients behind."""
        return None


class FiitedFusedOptimizer(InBackwardOptimizer):
    """Keys: ``pools.<pool>.weights`` -> state ``{"<pool>.momentum": tensor}`` (none for SGD).

    Args:
        pools: the store's pools by name.
        optimizer: "sgd", "adagrad" or "rowwise_adagrad".
        lr: learning rate.
        eps: Adagrad epsilon.
        weight_decay: L2 penalty.
    """

    def __init__(
        self,
        pools: Mapping[str, ChunkPool],
        optimizer: str,
        lr: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        params, state = _params_and_state(pools)
        group = {
            "params": list(params.values()),
            "lr": lr,
            "eps": eps,
            "weight_decay": weight_decay,
            "optimizer": optimizer,
        }
        super().__init__(params, state, [group])

    def refresh(self, pools: Mapping[str, ChunkPool]) -> None:
        """Point at the pools' current tensors, after FIITED-2D replaced them with narrower ones.

        In place, so LR schedulers and a ``CombinedOptimizer`` holding this object keep working.
        """
        params, state = _params_and_state(pools)
        self.params = params
        self.state = state
        self.param_groups[0]["params"] = list(params.values())


def _params_and_state(pools: Mapping[str, ChunkPool]):
    params: Dict[str, torch.Tensor] = {f"pools.{n}.weights": p.weights for n, p in pools.items()}
    state: Dict[Any, Any] = {
        p.weights: ({f"{n}.momentum": p.momentum} if p.momentum.numel() else {})
        for n, p in pools.items()
    }
    return params, state
