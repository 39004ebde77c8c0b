"""Pruning policy: chunk utilities, per-chunk ratios, thresholds, the pruning cycle, and the
FIITED-2D dimension decisions."""

from torchrec_fiited.policy.coordinator import (
    LocalCoordinator,
    ProcessGroupCoordinator,
    PruneCoordinator,
)
from torchrec_fiited.policy.cycle import (
    CycleCounts,
    PoolSample,
    apply_decision,
    count_seen,
    merge_samples,
    sample_pool,
)
from torchrec_fiited.policy.dims import (
    PoolColumns,
    decision_due,
    global_widths,
    kept_width,
    record_dim_utilities,
    top_columns,
)
from torchrec_fiited.policy.ratios import chunk_shares, fit_chunk_prune_ratios
from torchrec_fiited.policy.schedule import cycle_due
from torchrec_fiited.policy.thresholds import (
    DynamicThresholdPolicy,
    ManualRatioPolicy,
    PruneDecision,
    ThresholdPolicy,
)
from torchrec_fiited.policy.utility import missed_gains, record_missed_utilities

__all__ = [
    "CycleCounts",
    "DynamicThresholdPolicy",
    "LocalCoordinator",
    "ProcessGroupCoordinator",
    "PruneCoordinator",
    "ManualRatioPolicy",
    "PoolColumns",
    "PoolSample",
    "PruneDecision",
    "ThresholdPolicy",
    "apply_decision",
    "chunk_shares",
    "count_seen",
    "cycle_due",
    "decision_due",
    "global_widths",
    "kept_width",
    "record_dim_utilities",
    "missed_gains",
    "record_missed_utilities",
    "top_columns",
    "merge_samples",
    "fit_chunk_prune_ratios",
    "sample_pool",
]
