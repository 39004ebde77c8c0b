"""Shard a model's embedding tables over the ranks with torchrec's ``DistributedModelParallel``.

The sharders are torchrec's defaults plus FIITED's, and the planner is FIITED's (it reports the
pruned table sizes to torchrec's storage estimate), both from ``torchrec_fiited.distributed``.
DMP wraps the dense layers in DDP; the tables are updated by their fused optimizers in backward.
"""

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_fiited.app.parallel import DistEnv
from torchrec_fiited.distributed import fiited_sharders, make_fiited_planner

log = logging.getLogger(__name__)

#: Values of ``train.sharding_type`` (None lets the planner choose).
SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value,
                  ShardingType.COLUMN_WISE.value)
# On CPU torchrec's ShardedFusedEmbeddingBagCollection wraps data-parallel tables in
# DDP(device_ids=[cpu]), which DDP rejects; so the planner's free choice excludes it there.
_PLANNER_CHOICE_ON_CPU = [t.value for t in ShardingType if t != ShardingType.DATA_PARALLEL]


def sharding_constraints(tables: List[EmbeddingBagConfig], sharding_type: Optional[str],
                         device_type: str, world_size: int = 1, num_chunks: Optional[int] = None,
                         ) -> Optional[Dict[str, ParameterConstraints]]:
    """Per-table planner constraints for ``train.sharding_type`` (one of ``SHARDING_TYPES`` or
    None; ``TrainSpec`` validates it).

    Column-wise FIITED tables (``num_chunks`` K) are split into whole chunks over up to
    ``world_size`` ranks: torchrec's default minimum column shard (32) would leave the app's
    16-wide tables whole, i.e. table-wise.
    """
    if sharding_type is None and device_type != "cpu":
        return None
    types = [sharding_type] if sharding_type else _PLANNER_CHOICE_ON_CPU
    out = {}
    for t in tables:
        min_partition = None
        if sharding_type == ShardingType.COLUMN_WISE.value and num_chunks:
            chunk = t.embedding_dim // num_chunks
            min_partition = chunk * max(1, num_chunks // max(1, world_size))
        out[t.name] = ParameterConstraints(sharding_types=list(types), min_partition=min_partition)
    return out


def shard_model(model: torch.nn.Module, embeddings: torch.nn.Module, env: DistEnv,
                local_batch_size: int, sharding_type: Optional[str]
                ) -> Tuple[DistributedModelParallel, Dict[str, Dict[str, Any]]]:
    """``model`` wrapped in DMP with ``embeddings`` (a submodule) sharded, and the plan per table.

    Raises:
        ValueError: if no plan satisfies ``sharding_type``, or no sharder handles ``embeddings``.
    """
    path = next(name for name, m in model.named_modules() if m is embeddings)
    tables = embeddings.embedding_bag_configs()
    planner = make_fiited_planner(
        world_size=env.world_size, compute_device=env.device.type, batch_size=local_batch_size,
        constraints=sharding_constraints(
            tables, sharding_type, env.device.type, env.world_size,
            getattr(getattr(embeddings, "config", None), "num_chunks", None),
        ),
    )
    sharders = fiited_sharders()
    try:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    except PlannerError as e:
        raise ValueError(
            f"no sharding plan for train.sharding_type={sharding_type} on {env.device.type} "
            f"(torchrec's stock EBC sharders offer row_wise only on CUDA; on CPU use "
            f"train.sharding_type=table_wise or null): {e}"
        ) from e
    if path not in plan.plan:
        raise ValueError(
            f"no sharder handles {type(embeddings).__name__} (module {path!r}); sharders: "
            f"{sorted(type(s).__name__ for s in sharders)}. emb=fiited needs "
            "torchrec_fiited.distributed.FiitedEmbeddingBagCollectionSharder"
        )
    dmp = DistributedModelParallel(model, device=env.device, plan=plan, sharders=sharders)
    return dmp, plan_summary(plan)


def plan_summary(plan: ShardingPlan) -> Dict[str, Dict[str, Any]]:
    """``{table: {sharding_type, compute_kernel, ranks}}`` over every sharded module."""
    summary = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            ranks = ps.ranks
            if ranks is None and ps.sharding_spec is not None:
                ranks = [shard.placement.rank() for shard in ps.sharding_spec.shards]
            summary[table] = {"sharding_type": ps.sharding_type,
                              "compute_kernel": ps.compute_kernel, "ranks": ranks}
    return summary
