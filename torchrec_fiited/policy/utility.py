"""Chunk utility u = gamma * u + a * g, with the decay applied lazily.

An entry's utilities are stored as of ``last_step[e]``; bringing them to step t multiplies by
gamma ** (t - last_step[e]). That is exact, and it means a training step only touches the
entries in its batch: no O(table) decay pass.
"""

import torch

from torchrec_fiited.store.entry_table import EntryTable


class UtilityRule:
    """Scores chunks for pruning.

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
        age = (step - last_step.to(torch.int64)).clamp(min=0).to(utilities.dtype)
        return utilities * torch.pow(self.decay, age).unsqueeze(-1)

    def record(
        self,
        table: EntryTable,
        entries: torch.Tensor,
        accesses: torch.Tensor,
        chunk_grad_norms: torch.Tensor,
        step: int,
    ) -> None:
        """Add this step's a * g for ``entries`` (unique int64 [U]).

        Args:
            table: the entries' table.
            entries: unique entries touched at ``step``, int64 [U].
            accesses: a, occurrences of each entry in the batch, int64 [U].
            chunk_grad_norms: g, L2 norm of each chunk's coalesced gradient, fp32 [U, K]. Pruned
                chunks included: their gradient is the one at their zero-padded slice.
            step: the training step in progress.
        """
        u = self.decayed(table.utilities[entries], table.last_step[entries], step)
        a = accesses.to(u.dtype).unsqueeze(-1)
        u += a * chunk_grad_norms if self.kind == "grad_access" else a.expand_as(u)
        table.utilities[entries] = u
        table.last_step[entries] = step
