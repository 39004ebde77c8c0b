"""Pruning coordinators: how the ranks of a sharded collection agree on one pruning decision.

Every rank counts its seen entries and samples its shard; the coordinator sums the counts and
gathers the samples, so each rank computes the same global thresholds and enforced-pruning
decision from the same merged sample, then evicts and allocates in its own pools.
"""

import abc
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from torchrec_fiited.policy.cycle import PoolSample


class PruneCoordinator(abc.ABC):
    """Combines per-rank cycle inputs, keyed by logical pool."""

    @abc.abstractmethod
    def sum_counts(self, counts: Dict[str, int]) -> Dict[str, int]:
        """Seen entries per logical pool, summed over ranks."""

    @abc.abstractmethod
    def gather(self, samples: Dict[str, List[PoolSample]]) -> Dict[str, List[PoolSample]]:
        """Every rank's samples per logical pool, in rank order."""

    @abc.abstractmethod
    def gather_tensor(self, local: torch.Tensor) -> torch.Tensor:
        """[ranks, *local.shape]: every rank's ``local`` (a CPU tensor of one shape on every
        rank), in rank order."""


class LocalCoordinator(PruneCoordinator):
    """One process holds every shard: nothing to combine."""

    def sum_counts(self, counts: Dict[str, int]) -> Dict[str, int]:
        return dict(counts)

    def gather(self, samples: Dict[str, List[PoolSample]]) -> Dict[str, List[PoolSample]]:
        return {k: list(v) for k, v in samples.items()}

    def gather_tensor(self, local: torch.Tensor) -> torch.Tensor:
        return local.unsqueeze(0)


class ProcessGroupCoordinator(PruneCoordinator):
    """All-gathers counts and samples over a process group.

    Args:
        group: the group of the ranks holding the shards; a CPU (gloo) group, because the
            samples travel as pickled CPU tensors and must not queue behind NCCL traffic.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    def _all_gather(self, obj):
        out = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_counts(self, counts: Dict[str, int]) -> Dict[str, int]:
        every = self._all_gather(dict(counts))
        return {key: sum(c[key] for c in every) for key in counts}

    def gather(self, samples: Dict[str, List[PoolSample]]) -> Dict[str, List[PoolSample]]:
        on_cpu = {
            k: [PoolSample(s.utilities.cpu(), s.live.cpu(), s.row_keys.cpu(), s.chunk_offset) for s in v]
            for k, v in samples.items()
        }
        every = self._all_gather(on_cpu)
        return {k: [s for rank in every for s in rank[k]] for k in samples}

    def gather_tensor(self, local: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, local.contiguous(), group=self.group)
        return torch.stack(out)
