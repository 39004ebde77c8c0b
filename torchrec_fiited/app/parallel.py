"""The process group of a run and the few collectives the recipe needs.

Launched by ``torchrun`` (``WORLD_SIZE > 1``) the run joins the default process group: NCCL with
one GPU per process when CUDA is available, else gloo on CPU. Otherwise it is a single process
and every collective below is the identity, so the recipe has one code path.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run.

    Args:
        rank: global rank.
        world_size: number of processes W.
        local_rank: rank on this host (picks the GPU).
        device: the device this rank computes on.
        owns_process_group: this run initialised the default group (and so destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics.json and renames checkpoints."""
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the default process group when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=local_rank, device=device, owns_process_group=owns)


def close_distributed(env: DistEnv) -> None:
    if env.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def broadcast_from_main(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(env: DistEnv, value: torch.Tensor) -> float:
    """Mean of a scalar over the ranks: the global mean loss when every rank's batch is the
    same size."""
    if not env.is_distributed:
        return float(value)
    total = value.detach().reshape(1).to(env.device, torch.float64)
    dist.all_reduce(total)
    return float(total) / env.world_size


def sum_over_ranks(env: DistEnv, value: int) -> int:
    if not env.is_distributed:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(total)
    return int(total)


def all_gather_rows(env: DistEnv, rows: torch.Tensor) -> torch.Tensor:
    """``[W * N, ...]``: every rank's ``[N, ...]`` rows, rank 0's first (N equal on all ranks)."""
    if not env.is_distributed:
        return rows
    rows = rows.to(env.device).contiguous()
    parts = [torch.empty_like(rows) for _ in range(env.world_size)]
    dist.all_gather(parts, rows)
    return torch.cat(parts).cpu()


def gather_objects(env: DistEnv, obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not env.is_distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
