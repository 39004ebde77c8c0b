"""From table configs and a FiitedConfig to pool layouts, capacities and threshold policies."""

from typing import Dict, List, Tuple

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


def plan_pools(
    tables: List[EmbeddingBagConfig], config: FiitedConfig
) -> Tuple[List[TableLayout], Dict[str, int], Dict[str, float]]:
    """Group tables into pools and size each pool to its budget.

    Tables with the global budget share one pool per chunk size, so they compete for slots by
    utility (the paper's global pools); a table with a ``table_budgets`` override gets its own.

    Returns:
        table layouts, pool capacities in slots, pool budgets.

    Raises:
        ValueError: naming the table, for a dim not divisible by K, an unsupported pooling or
            dtype, an override for an unknown table, or a budget too small for a single slot.
    """
    check_table_names([t.name for t in tables])
    unknown = sorted(set(config.table_budgets) - {t.name for t in tables})
    if unknown:
        raise ValueError(f"table_budgets names unknown tables {unknown}")
    K = config.num_chunks
    layouts: List[TableLayout] = []
    full_floats: Dict[str, int] = {}
    budgets: Dict[str, float] = {}
    for t in tables:
        _check_table(t, K)
        chunk_size = t.embedding_dim // K
        pool = f"own_{t.name}" if t.name in config.table_budgets else f"shared_cs{chunk_size}"
        layouts.append(
            TableLayout(
                t.name, t.num_embeddings, t.embedding_dim, chunk_size, pool,
                t.get_weight_init_min(), t.get_weight_init_max(),
            )
        )
        full_floats[pool] = full_floats.get(pool, 0) + t.num_embeddings * t.embedding_dim
        budgets[pool] = config.budget_for(t.name)
    chunk_size = {l.pool: l.chunk_size for l in layouts}
    capacities = {p: int(budgets[p] * n // chunk_size[p]) for p, n in full_floats.items()}
    for pool, cap in capacities.items():
        if cap < 1:
            names = [l.name for l in layouts if l.pool == pool]
            raise ValueError(f"budget {budgets[pool]} leaves no chunk slot for tables {names}")
    return layouts, capacities, budgets


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
    return ManualRatioPolicy(ratios, config.enforce_ratio)
