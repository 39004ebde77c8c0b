"""From table configs and a FiitedConfig to pool layouts, capacities and threshold policies.

Two views of the pools. *Logical* pools group the module's global tables: they fix the budgets,
the fitted per-chunk ratios and the capacities that thresholds are computed for. *Local* pools
are what this process allocates: all of them when unsharded, or its shard's part when a sharded
collection hands it a slice of rows (row-wise) or a range of chunks (column-wise) of a table.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_fiited.config import FiitedConfig
from torchrec_fiited.modules.validation import check_table_names
from torchrec_fiited.policy import (
    DynamicThresholdPolicy,
    ManualRatioPolicy,
    ThresholdPolicy,
    fit_chunk_prune_ratios,
)
from torchrec_fiited.store import TableLayout


@dataclass(frozen=True)
class TableShard:
    """Which part of a global table a local table holds.

    Args:
        global_name: the table it is a shard of.
        row_offset: global row of its row 0.
        col_offset: global column of its column 0 (a multiple of the chunk size).
    """

    global_name: str
    row_offset: int = 0
    col_offset: int = 0


@dataclass
class PoolPlan:
    """Everything ``plan_pools`` decides.

    Args:
        layouts: local table layouts.
        num_chunks: K of the local store (K / column shards for a column-wise shard).
        capacities: slots per local pool.
        policies: per local pool, the policy whose admission quotas first touches follow.
        logical: per logical pool, (capacity, policy over all K chunks) for the thresholds.
        logical_of: the logical pool of each local pool.
    """

    layouts: List[TableLayout]
    num_chunks: int
    capacities: Dict[str, int]
    policies: Dict[str, ThresholdPolicy]
    logical: Dict[str, Tuple[int, ThresholdPolicy]]
    logical_of: Dict[str, str]


def plan_pools(
    tables: List[EmbeddingBagConfig],
    config: FiitedConfig,
    shards: Optional[Mapping[str, TableShard]] = None,
    global_tables: Optional[List[EmbeddingBagConfig]] = None,
) -> PoolPlan:
    """Group tables into pools and size each pool to its budget.

    Tables with the global budget share one pool per chunk size, so they compete for slots by
    utility (the paper's global pools); a table with a ``table_budgets`` override gets its own.
    A shard's pool holds its share of its logical pool's budget: budget x its rows (row-wise),
    or the slots its chunk range is due under the fitted ratios (column-wise).

    Raises:
        ValueError: for ``shards`` with dim pruning on; naming the table, for a dim not divisible by K, an unsupported pooling or
            dtype, an override for an unknown table, a budget too small for a single slot, or a
            column shard that does not hold whole chunks.
    """
    if shards is not None and config.dim_pruning.enabled:
        raise ValueError(
            "dim_pruning (FIITED-2D) is not supported by the sharded collection yet: set "
            "dim_pruning.target_ratio=0, or train unsharded"
        )
    global_tables = list(global_tables if global_tables is not None else tables)
    shards = dict(shards or {t.name: TableShard(t.name) for t in tables})
    check_table_names([t.name for t in global_tables])
    unknown = sorted(set(config.table_budgets) - {t.name for t in global_tables})
    if unknown:
        raise ValueError(f"table_budgets names unknown tables {unknown}")
    K = config.num_chunks
    by_name = {t.name: t for t in global_tables}
    logical_pool: Dict[str, str] = {}
    full_floats: Dict[str, int] = {}
    full_rows: Dict[str, int] = {}
    budgets: Dict[str, float] = {}
    for t in global_tables:
        _check_table(t, K)
        pool = f"own_{t.name}" if t.name in config.table_budgets else f"shared_cs{t.embedding_dim // K}"
        logical_pool[t.name] = pool
        full_floats[pool] = full_floats.get(pool, 0) + t.num_embeddings * t.embedding_dim
        full_rows[pool] = full_rows.get(pool, 0) + t.num_embeddings
        budgets[pool] = config.budget_for(t.name)
    chunk_size_of = {logical_pool[t.name]: t.embedding_dim // K for t in global_tables}
    logical = {
        p: (
            _capacity(
                budgets[p] * n, chunk_size_of[p], [t for t, q in logical_pool.items() if q == p],
                budgets[p],
            ),
            make_policy(config, budgets[p]),
        )
        for p, n in full_floats.items()
    }

    layouts: List[TableLayout] = []
    local_floats: Dict[str, float] = {}
    local_policy: Dict[str, ThresholdPolicy] = {}
    logical_of: Dict[str, str] = {}
    num_chunks_local = set()
    for t in tables:
        shard = shards[t.name]
        g = by_name[shard.global_name]
        cs = g.embedding_dim // K
        if t.embedding_dim % cs or shard.col_offset % cs:
            raise ValueError(
                f"table {g.name!r}: a column shard at column {shard.col_offset} of width "
                f"{t.embedding_dim} does not hold whole chunks of {cs} columns (K={K})"
            )
        k_local, chunk_offset = t.embedding_dim // cs, shard.col_offset // cs
        num_chunks_local.add(k_local)
        key = logical_pool[g.name]
        pool = key if k_local == K else f"{key}@c{chunk_offset}"
        capacity, policy = logical[key]
        budget = budgets[key] if k_local == K else _chunk_range_fraction(
            policy, budgets[key], capacity, full_rows[key], chunk_offset, k_local
        )
        layouts.append(
            TableLayout(
                t.name, t.num_embeddings, t.embedding_dim, cs, pool,
                g.get_weight_init_min(), g.get_weight_init_max(),
                g.name, shard.row_offset, chunk_offset,
            )
        )
        local_floats[pool] = local_floats.get(pool, 0.0) + min(1.0, budget) * t.num_embeddings * t.embedding_dim
        local_policy[pool] = _local_policy(policy, chunk_offset, k_local, config.enforce_ratio)
        logical_of[pool] = key
    if len(num_chunks_local) > 1:
        raise ValueError(
            f"column shards must all hold the same number of chunks, got {sorted(num_chunks_local)}"
        )
    chunk_size = {l.pool: l.chunk_size for l in layouts}
    capacities = {
        p: _capacity(n, chunk_size[p], [l.name for l in layouts if l.pool == p], budgets[logical_of[p]])
        for p, n in local_floats.items()
    }
    return PoolPlan(
        layouts, num_chunks_local.pop() if num_chunks_local else K, capacities, local_policy,
        logical, logical_of,
    )


def _capacity(floats: float, chunk_size: int, tables: List[str], budget: float) -> int:
    # The epsilon keeps a product like 0.3 * 1000 from flooring to 299 through float noise.
    cap = int(floats / chunk_size + 1e-6)
    if cap < 1:
        raise ValueError(f"budget {budget} leaves no chunk slot for tables {tables}")
    return cap


def _chunk_range_fraction(
    policy: ThresholdPolicy, budget: float, capacity: int, num_rows: int, chunk_offset: int,
    k_local: int,
) -> float:
    """Fraction of its chunks a column shard holding chunks [offset, offset + k_local) gets
    slots for. Where the budget is the target (manual ratios filling the pool): what the logical
    pool keeps of those chunk indices once every row is seen, water-filled so no chunk index is
    due more slots than rows. Where it is only a cap (fixed ratios, dynamic): the budget."""
    if not isinstance(policy, ManualRatioPolicy) or policy.fixed:
        return budget
    keep = policy.keep_fractions(capacity, num_rows)
    return float(keep[chunk_offset : chunk_offset + k_local].mean())


def _local_policy(policy: ThresholdPolicy, chunk_offset: int, k_local: int, enforce: float) -> ThresholdPolicy:
    if k_local == policy.num_chunks:
        return policy
    if isinstance(policy, ManualRatioPolicy):
        return ManualRatioPolicy(
            policy.ratios[chunk_offset : chunk_offset + k_local], enforce, fixed=policy.fixed
        )
    return DynamicThresholdPolicy(k_local, enforce)


def _check_table(t: EmbeddingBagConfig, K: int) -> None:
    if t.num_embeddings < 1:
        raise ValueError(f"table {t.name!r}: num_embeddings must be >= 1, got {t.num_embeddings}")
    if t.embedding_dim % K:
        raise ValueError(
            f"table {t.name!r}: embedding_dim {t.embedding_dim} is not divisible by num_chunks={K}"
        )
    if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
        raise ValueError(f"table {t.name!r}: pooling must be SUM or MEAN, got {t.pooling}")
    if t.data_type != DataType.FP32:
        raise ValueError(f"table {t.name!r}: only FP32 tables are supported, got {t.data_type}")


def make_policy(config: FiitedConfig, pool_budget: float) -> ThresholdPolicy:
    """The threshold policy of one pool: per-chunk ratios fitted to its budget, or dynamic."""
    if config.ratio_mode == "dynamic":
        return DynamicThresholdPolicy(config.num_chunks, config.enforce_ratio)
    ratios = config.chunk_prune_ratios or fit_chunk_prune_ratios(
        config.num_chunks, 1.0 - pool_budget, config.power_law_exponent,
        config.max_chunk_prune_ratio,
    )
    return ManualRatioPolicy(ratios, config.enforce_ratio, fixed=config.ratio_target == "ratios")
