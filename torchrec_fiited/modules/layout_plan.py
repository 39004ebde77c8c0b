"""From table configs and a FiitedConfig to pool layouts, capacities and threshold policies.

Two views of the pools. *Logical* pools group the module's global tables: they fix the budgets,
the fitted per-chunk ratios and the capacities that thresholds are computed for. *Local* pools
are what this process allocates: all of them when unsharded, or its shard's part when a sharded
collection hands it a slice of rows (row-wise) or a range of chunks (column-wise) of a table.
"""

import warnings
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
from torchrec_fiited.store.fallback import bucket_width
from torchrec_fiited.store.sizing import (
    SKETCH_CELL_BYTES,
    SKETCH_DEPTH,
    PoolSizes,
    TableSpec,
    dim_map_bytes,
    full_table_bytes,
    min_pool_bytes,
    size_pool,
)


@dataclass(frozen=True)
class TableShard:
    """Which part of a global table a local table holds.

    Args:
        global_name: the table it is a shard of.
        row_offset: global row of its row 0.
        col_offset: global column of its column 0 (a multiple of the chunk size).
        row_block: a row-wise shard by hash range [lo, hi) of ``store.row_permutation`` over
            the global table's rows (``row_offset`` 0; the local table's ``num_embeddings`` is
            the global id space, and hi - lo rows size its pool).
    """

    global_name: str
    row_offset: int = 0
    col_offset: int = 0
    row_block: Optional[Tuple[int, int]] = None


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
        sizes: the sizes of each local pool's tensors (``store.sizing``).
    """

    layouts: List[TableLayout]
    num_chunks: int
    capacities: Dict[str, int]
    policies: Dict[str, ThresholdPolicy]
    logical: Dict[str, Tuple[int, ThresholdPolicy]]
    logical_of: Dict[str, str]
    sizes: Dict[str, PoolSizes]


@dataclass(frozen=True)
class LogicalPools:
    """How a collection's global tables group into logical pools, and what each pool holds.

    Args:
        pool_of: the logical pool of each global table.
        budgets: each pool's budget (its tables share it).
        num_rows: rows of each pool's tables, summed.
        pools: per pool, (slots, policy over all K chunks): what thresholds are computed for.
        sizes: per pool, the sizes of its tensors when unsharded (``store.sizing``).
    """

    pool_of: Dict[str, str]
    budgets: Dict[str, float]
    num_rows: Dict[str, int]
    pools: Dict[str, Tuple[int, ThresholdPolicy]]
    sizes: Dict[str, PoolSizes]


def sizing_options(config: FiitedConfig) -> Dict[str, object]:
    """The FiitedConfig fields ``store.sizing.size_pool`` reads."""
    return {
        "miss": config.miss,
        "fallback_fraction": config.fallback_fraction,
        "sketch_fraction": config.sketch_fraction,
        "entries_per_slot": config.entries_per_slot,
        "bucket_size": config.bucket_size,
        "dim_pruning": config.dim_pruning.enabled,
    }


def _spec(t: EmbeddingBagConfig) -> TableSpec:
    return TableSpec(t.name, t.num_embeddings, t.embedding_dim)


def logical_pools(global_tables: List[EmbeddingBagConfig], config: FiitedConfig) -> LogicalPools:
    """Group ``global_tables`` into logical pools and size each to its budget.

    Tables with the global budget share one pool per chunk size, so they compete for slots by
    utility (the paper's global pools); a table with a ``table_budgets`` override gets its own.

    Raises:
        ValueError: naming the table, for a dim not divisible by K, an unsupported pooling or
            dtype, an override for an unknown table, or a budget too small for a single slot.
    """
    check_table_names([t.name for t in global_tables])
    unknown = sorted(set(config.table_budgets) - {t.name for t in global_tables})
    if unknown:
        raise ValueError(f"table_budgets names unknown tables {unknown}")
    K = config.num_chunks
    pool_of: Dict[str, str] = {}
    full_floats: Dict[str, int] = {}
    num_rows: Dict[str, int] = {}
    budgets: Dict[str, float] = {}
    for t in global_tables:
        _check_table(t, K)
        pool = f"own_{t.name}" if t.name in config.table_budgets else f"shared_cs{t.embedding_dim // K}"
        pool_of[t.name] = pool
        full_floats[pool] = full_floats.get(pool, 0) + t.num_embeddings * t.embedding_dim
        num_rows[pool] = num_rows.get(pool, 0) + t.num_embeddings
        budgets[pool] = config.budget_for(t.name)
    specs = {p: [_spec(t) for t in global_tables if pool_of[t.name] == p] for p in full_floats}
    sizes = {
        p: size_pool(specs[p], budgets[p], K, config.optimizer, **sizing_options(config))
        for p in full_floats
    }
    pools = {
        p: (sizes[p].slots, make_policy(config, budgets[p], resident_prune_ratio(sizes[p], num_rows[p], K)))
        for p in full_floats
    }
    if config.dim_pruning.enabled:
        for p in full_floats:
            _warn_if_dim_maps_dominate(p, specs[p], budgets[p], config.optimizer)
    return LogicalPools(pool_of, budgets, num_rows, pools, sizes)


# Above this share of a pool's budget, FIITED-2D's column maps crowd out its chunks: a warning. On the
# hard preset the maps are 69% at budget 0.001 (FIITED-2D 0.08 AUC below FIITED) and 7% at 0.01
# (0.008 below); where between the line goes is a judgement, not a measurement.
DIM_MAP_WARN_SHARE = 0.25


def _warn_if_dim_maps_dominate(pool: str, tables: List[TableSpec], budget: float,
                               optimizer: str) -> None:
    budget_bytes = budget * sum(full_table_bytes(t.num_rows, t.dim, optimizer) for t in tables)
    maps = dim_map_bytes(tables)
    if maps > DIM_MAP_WARN_SHARE * budget_bytes:
        warnings.warn(
            f"[torchrec_fiited] pool {pool!r}: FIITED-2D's column maps take {maps:,} of its "
            f"{budget_bytes:,.0f} budget bytes ({maps / budget_bytes:.0%}) at budget {budget:g}, "
            f"bytes its chunks do not get; at this budget consider training without dimension "
            f"pruning (dim_pruning.target_ratio=0) or a larger budget for the pool",
            stacklevel=2,
        )


def fallback_widths(global_tables: List[EmbeddingBagConfig], logical: LogicalPools) -> Dict[str, int]:
    """Permuted rows per hashed-fallback bucket of each global table (0: none): from the rows
    its unsharded pool's sizing gives it, so every plan and shard of the table agrees on them."""
    return {
        g.name: bucket_width(
            g.num_embeddings, logical.sizes[logical.pool_of[g.name]].fallback_rows.get(g.name, 0)
        )
        for g in global_tables
    }


def shard_full_bytes(rows: int, cols: int, dim: int, optimizer: str) -> float:
    """A shard's part of its table's full bytes: ``cols`` of ``dim`` columns of ``rows`` rows.
    A column shard's share of a per-row optimizer state (rowwise Adagrad) is its share of the
    columns, so the shards of a table add up to the table (not to one state per shard)."""
    return full_table_bytes(rows, dim, optimizer) * cols / dim


def shard_pool_fraction(
    logical: LogicalPools, global_table: str, chunk_offset: int, k_local: int
) -> float:
    """Fraction of a shard's ``rows x k_local * chunk_size`` floats its local pool holds.

    The one sizing rule for what a shard allocates: ``plan_pools`` sizes the pools with it, and
    the planner's storage estimator (``distributed/planner.py``) charges shards by it. A shard
    holding every chunk of its rows (unsharded, table-wise, row-wise) gets its pool's budget. A
    column shard holding chunks [chunk_offset, chunk_offset + k_local): where the budget is the
    target (manual ratios filling the pool), the budget weighted by how much the logical pool
    keeps of those chunk indices against all K (once every row is seen, water-filled so no chunk
    index is due more slots than rows), so the shards of a table together get its budget; where
    it is only a cap (fixed ratios, dynamic), the budget.

    (Store v1 gave a column shard the kept fraction itself: with store v2's entries and sketch
    taking their part of every pool, that left column pools a quarter of their budget.)
    """
    key = logical.pool_of[global_table]
    budget = logical.budgets[key]
    capacity, policy = logical.pools[key]
    if k_local == policy.num_chunks or not isinstance(policy, ManualRatioPolicy) or policy.fixed:
        return min(1.0, budget)
    keep = policy.keep_fractions(capacity, logical.num_rows[key])
    mean = float(keep.mean())
    if mean <= 0.0:
        return min(1.0, budget)
    return min(1.0, budget * float(keep[chunk_offset : chunk_offset + k_local].mean()) / mean)


def shard_budget(
    logical: LogicalPools, global_table: str, chunk_offset: int, k_local: int, rows: int,
    cols: int, dim: int, optimizer: str,
) -> Tuple[float, Optional[float]]:
    """(bytes, sketch cells per row of sketch depth) of a shard of ``rows`` rows and ``cols`` of
    ``dim`` columns of ``global_table``; the cells are None where the shard sizes its own sketch.

    A shard gets ``shard_pool_fraction`` of its full bytes. A column shard of a logical pool
    with a sketch instead holds its chunk range's part of the logical pool's sketch (the cells
    of one process's sketch for its rows and chunks), and the fitted share of the rest: the
    sketch estimates the utilities of every id of the table, so its resolution should not fall
    with the few slots the last chunks are due (the last chunk's shard at 100x had 139 cells
    per row for 111k ids, one process 946 for each chunk, and it admitted ids blindly: 38 of
    its 89 chunks sat on rows holding no chunk 0; AUC -0.0046 against one process, -0.0016
    with this, 5 seeds). The shards of a table still add up to its budget: sketch + (budget -
    sketch) x the water-filled shares.
    """
    fraction = shard_pool_fraction(logical, global_table, chunk_offset, k_local)
    full = shard_full_bytes(rows, cols, dim, optimizer)
    key = logical.pool_of[global_table]
    _, policy = logical.pools[key]
    width = logical.sizes[key].sketch_width
    if k_local == policy.num_chunks or not width:
        return fraction * full, None
    cells = width * rows / logical.num_rows[key]  # the logical sketch's cells for these rows
    sketch = SKETCH_CELL_BYTES * SKETCH_DEPTH * cells  # per chunk index
    budget = min(1.0, logical.budgets[key])
    weight = fraction / budget if budget > 0 else 1.0  # keep[range].mean() / keep.mean()
    rest = max(0.0, budget * full - sketch * k_local)
    return sketch * k_local + weight * rest, cells


def plan_pools(
    tables: List[EmbeddingBagConfig],
    config: FiitedConfig,
    shards: Optional[Mapping[str, TableShard]] = None,
    global_tables: Optional[List[EmbeddingBagConfig]] = None,
) -> PoolPlan:
    """Group tables into pools and size each pool to its budget.

    Logical pools follow ``logical_pools``; a shard's local pool holds ``shard_pool_fraction``
    of its floats: budget x its rows (row-wise), or the slots its chunk range is due under the
    fitted ratios (column-wise). Shards of a rank with the same logical pool and chunk range
    share one local pool.

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
    K = config.num_chunks
    by_name = {t.name: t for t in global_tables}
    logical = logical_pools(global_tables, config)

    index_of = {t.name: i for i, t in enumerate(global_tables)}
    widths = fallback_widths(global_tables, logical)
    local_fallback: Dict[str, Dict[str, int]] = {}
    layouts: List[TableLayout] = []
    local_bytes: Dict[str, float] = {}
    local_cells: Dict[str, float] = {}
    local_specs: Dict[str, List[TableSpec]] = {}
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
        key = logical.pool_of[g.name]
        pool = key if k_local == K else f"{key}@c{chunk_offset}"
        layouts.append(
            TableLayout(
                t.name, t.num_embeddings, t.embedding_dim, cs, pool,
                g.get_weight_init_min(), g.get_weight_init_max(),
                g.name, shard.row_offset, chunk_offset, index_of[g.name], shard.row_block,
                widths[g.name],
            )
        )
        if layouts[-1].fallback_grid.rows:
            local_fallback.setdefault(pool, {})[t.name] = layouts[-1].fallback_grid.rows
        rows = layouts[-1].num_rows  # the budget sizes the rows it holds, not its id space
        shard_bytes, cells = shard_budget(logical, g.name, chunk_offset, k_local, rows,
                                          t.embedding_dim, g.embedding_dim, config.optimizer)
        local_bytes[pool] = local_bytes.get(pool, 0.0) + shard_bytes
        if cells is not None:
            local_cells[pool] = local_cells.get(pool, 0.0) + cells
        local_specs.setdefault(pool, []).append(TableSpec(t.name, rows, t.embedding_dim))
        local_policy[pool] = _local_policy(logical.pools[key][1], chunk_offset, k_local, config.enforce_ratio)
        logical_of[pool] = key
    if len(num_chunks_local) > 1:
        raise ValueError(
            f"column shards must all hold the same number of chunks, got {sorted(num_chunks_local)}"
        )
    k_local = num_chunks_local.pop() if num_chunks_local else K
    # A local pool holding whole global tables (unsharded, or table-wise) is its logical pool;
    # a pool of row or column shards is sized to its shards' share of the budget.
    whole = {p: [_spec(g) for g in global_tables if logical.pool_of[g.name] == p] for p in logical.sizes}
    # A shard's fallback rows are the buckets of its table's grid that meet its rows (a whole
    # table's are its logical pool's).
    sizes = {
        p: logical.sizes[p] if local_specs[p] == whole.get(p) else size_pool(
            local_specs[p], 1.0, k_local, config.optimizer,
            budget_bytes=max(local_bytes[p], min_pool_bytes(
                local_specs[p], k_local, config.optimizer, config.dim_pruning.enabled)),
            fallback_rows=local_fallback.get(p, {}),
            sketch_width=int(local_cells[p]) if p in local_cells else None,
            **sizing_options(config),
        )
        for p in local_specs
    }
    capacities = {p: s.slots for p, s in sizes.items()}
    return PoolPlan(
        layouts, k_local, capacities, local_policy, logical.pools, logical_of, sizes,
    )



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


def resident_prune_ratio(sizes: PoolSizes, num_rows: int, num_chunks: int) -> float:
    """Mean fraction of the resident rows' chunks a full pool leaves pruned: 1 - slots / (K x
    entries), entries capped at the rows there are. Independent of the budget (the sizing keeps
    ``entries_per_slot`` fixed), so the fitted ratios keep chunk skew at every budget."""
    residents = max(1, min(sizes.entries, num_rows))
    return max(0.0, 1.0 - sizes.slots / (num_chunks * residents))


def make_policy(config: FiitedConfig, pool_budget: float, resident_ratio: float) -> ThresholdPolicy:
    """The threshold policy of one pool: per-chunk ratios, or dynamic.

    Manual ratios are fitted (power law, capped at ``max_chunk_prune_ratio``) to average
    ``resident_ratio``: the fraction of chunks pruned among the *resident* rows, which the store
    makes the population of every cycle. The paper fits them to ``1 - budget`` over every row of
    the table; with a budget below ~0.05 that puts every chunk index at the 95% cap and FIITED
    degenerates to row pruning. Over the residents the mean stays near 1 - 1 / (K x
    entries_per_slot) (0.6 at K=2) whatever the budget, so chunk 0 is kept for several times as
    many rows as chunk K-1 at every budget (issue 11, item 7). With ``ratio_target="ratios"``
    (the paper's literal rule over seen rows) the fit is to ``1 - pool_budget`` as in the paper.
    """
    if config.ratio_mode == "dynamic":
        return DynamicThresholdPolicy(config.num_chunks, config.enforce_ratio)
    fixed = config.ratio_target == "ratios"
    ratios = config.chunk_prune_ratios or fit_chunk_prune_ratios(
        config.num_chunks, 1.0 - pool_budget if fixed else resident_ratio,
        config.power_law_exponent, config.max_chunk_prune_ratio,
    )
    return ManualRatioPolicy(ratios, config.enforce_ratio, fixed=fixed)
