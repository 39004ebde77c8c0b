"""Chunk utility u = gamma * u + a * g, with the decay applied lazily.

An entry's utilities are stored as of ``last_step[e]``; bringing them to step t multiplies by
gamma ** (t - last_step[e]). That is exact, and it means a training step only touches the
entries in its batch: no O(table) decay pass.
"""

import torch

from torchrec_fiited.ops import decayed_utilities


class UtilityRule:
    """Scores chunks for pruning; the per-step update itself is part of ``ops.fused_backward``.

    Args:
        kind: "grad_access" (a * ||g||, the paper) or "access" (a, decayed access count as in
            TorchRec's ITEP).
        decay: gamma in (0, 1].
    """

    def __init__(self, kind: str, decay: float) -> None:
        self.kind = kind
        self.decay = decay

    def decayed(self, utilities: torch.Tensor, last_step: torch.Tensor, step: int) -> torch.Tensor:
        """Utilities fp32 [n, K] stored at ``last_step`` int32 [n], brought to ``step``."""
        return decayed_utilities(utilities, last_step, step, self.decay)
