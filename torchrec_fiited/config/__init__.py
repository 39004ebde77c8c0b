"""Frozen configuration dataclasses (usable as Hydra structured configs)."""

from torchrec_fiited.config.fiited_config import DimPruningConfig, FiitedConfig, decay_for_budget

__all__ = ["DimPruningConfig", "FiitedConfig", "decay_for_budget"]
