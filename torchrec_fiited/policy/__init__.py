"""Pruning policy: chunk utilities, per-chunk ratios, thresholds and the pruning cycle."""

from torchrec_fiited.policy.cycle import CycleCounts, PoolSample, apply_decision, sample_pool
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
    "ManualRatioPolicy",
    "PoolSample",
    "PruneDecision",
    "ThresholdPolicy",
    "UtilityRule",
    "apply_decision",
    "chunk_shares",
    "cycle_due",
    "fit_chunk_prune_ratios",
    "sample_pool",
]
