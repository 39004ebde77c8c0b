"""Pruning policy: chunk utilities, per-chunk ratios, thresholds and the pruning cycle."""

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
from torchrec_fiited.policy.ratios import chunk_shares, fit_chunk_prune_ratios
from torchrec_fiited.policy.schedule import cycle_due
from torchrec_fiited.policy.thresholds import (
    DynamicThresholdPolicy,
    ManualRatioPolicy,
    PruneDecision,
    ThresholdPolicy,
)
from torchrec_fiited.policy.utility import UtilityRule

__all__ = [
    "CycleCounts",
    "DynamicThresholdPolicy",
    "LocalCoordinator",
    "ProcessGroupCoordinator",
    "PruneCoordinator",
    "ManualRatioPolicy",
    "PoolSample",
    "PruneDecision",
    "ThresholdPolicy",
    "UtilityRule",
    "apply_decision",
    "chunk_shares",
    "count_seen",
    "cycle_due",
    "merge_samples",
    "fit_chunk_prune_ratios",
    "sample_pool",
]
