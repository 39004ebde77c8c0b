"""The ``model`` and ``train`` config groups of the training app, validated on construction."""

from dataclasses import dataclass, field
from typing import List, Optional

from torchrec_fiited.app.sharding import SHARDING_TYPES


@dataclass(frozen=True)
class ModelSpec:
    """The ``model`` config group: DLRM sizes (dense_arch must end at embedding_dim)."""

    embedding_dim: int = 16
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1])


@dataclass(frozen=True)
class TrainSpec:
    """The ``train`` config group.

    Args:
        batch_size: global training batch size; with W processes each takes batch_size / W.
        test_batch_size: global evaluation batch size.
        epochs: passes over the training data (ignored when ``steps`` is set).
        steps: total training steps, or None for ``epochs``.
        sparse_lr: learning rate of the fused embedding optimizer (rowwise Adagrad).
        sparse_eps: its epsilon.
        dense_lr: Adam learning rate of the dense layers.
        shuffle: a new seeded permutation of the examples every epoch (else time order, as the
            paper trains).
        drop_last: drop a short final batch (always done with more than one process).
        progress: show a tqdm bar (rank 0 only).
        sharding_type: distributed runs: ``table_wise``, ``row_wise`` or ``column_wise`` for every
            table, or None to let the planner choose.
        checkpoint_every: save a checkpoint every this many steps; 0 = never.
        checkpoint_dir: where checkpoints go; None = ``<output_dir>/checkpoints``.
        resume: continue from the newest complete checkpoint there (a fresh start if none).
        stop_after_steps: exit once this many steps are done, after any checkpoint due then
            (simulates a kill; ops and tests); None = train to the end.
    """

    batch_size: int = 2048
    test_batch_size: int = 8192
    epochs: int = 1
    steps: Optional[int] = None
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    dense_lr: float = 1e-3
    shuffle: bool = False
    drop_last: bool = False
    progress: bool = True
    sharding_type: Optional[str] = None
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    stop_after_steps: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "test_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "stop_after_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0 (0 = off), got {self.checkpoint_every}")
        if self.sharding_type is not None and self.sharding_type not in SHARDING_TYPES:
            raise ValueError(
                f"train.sharding_type must be null or one of {list(SHARDING_TYPES)}, "
                f"got {self.sharding_type!r}"
            )
