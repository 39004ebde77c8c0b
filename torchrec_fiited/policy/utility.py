"""Chunk utility u = gamma * u + a * g, with the decay applied lazily.

An entry's utilities are stored as of ``last_step[e]``; bringing them to step t multiplies by
gamma ** (t - last_step[e]). That is exact, and it means a training step only touches the
entries in its batch: no O(table) decay pass.
"""

import torch

from torchrec_fiited.ops import decayed_utilities
from torchrec_fiited.ops.reference import coalesced_gains


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


def record_missed_utilities(sketch, keys: torch.Tensor, grads: torch.Tensor, params) -> None:
    """Add a * ||g_chunk|| of non-resident ``keys`` (int64 [n]) to ``sketch``.

    ``grads`` fp32 [n, D_stored] are the ids' gradients at the zero rows they read; as in the
    fused backward, repeated keys are summed first and a is their count, so a key scores in the
    sketch exactly what it would score as an entry with every chunk pruned.
    """
    if sketch.width == 0 or keys.numel() == 0:
        return
    unique, _, gains = coalesced_gains(keys, grads, sketch.num_chunks, params.utility)
    sketch.add(unique, gains)
