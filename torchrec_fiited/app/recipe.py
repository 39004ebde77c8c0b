"""The training recipe: setup -> train -> evaluate -> write metrics.json.

Flat on purpose (torchtune's recipe shape): the library does the work, this wires it together.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from torchrec_fiited import FiitedEmbeddingBagCollection
from torchrec_fiited.app.embeddings import EmbeddingSpec, build_embeddings, embedding_bytes
from torchrec_fiited.app.loop import TrainResult, evaluate, train
from torchrec_fiited.app.model import build_dlrm, dense_parameters, make_tables
from torchrec_fiited.data.registry import load_dataset

log = logging.getLogger(__name__)


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
        batch_size: training batch size.
        test_batch_size: evaluation batch size.
        epochs: passes over the training data (ignored when ``steps`` is set).
        steps: total training steps, or None for ``epochs``.
        sparse_lr: learning rate of the fused embedding optimizer (rowwise Adagrad).
        sparse_eps: its epsilon.
        dense_lr: Adam learning rate of the dense layers.
        shuffle: shuffle the training examples once (else time order, as the paper trains).
        drop_last: drop a short final batch (needed for row-wise sharding on gloo).
        progress: show a tqdm bar.
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

    def __post_init__(self) -> None:
        for name in ("batch_size", "test_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps must be >= 1 or null, got {self.steps}")


class TrainRecipe:
    """One run: a DLRM with the ``emb`` method on ``dataset``, written to ``output_dir``."""

    def __init__(self, cfg: Dict[str, Any], output_dir: str) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.budget = float(cfg["budget"])
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        self.seed = int(cfg["seed"])
        self.emb = EmbeddingSpec(**cfg["emb"])
        self.model_spec = ModelSpec(**cfg["model"])
        self.train_spec = TrainSpec(**cfg["train"])
        self.allocation: List[Dict[str, Any]] = []

    def setup(self) -> None:
        t = self.train_spec
        data = dict(self.cfg["dataset"])
        self.dataset_name = data.pop("name")
        self.train_batches, self.test_batches, self.spec = load_dataset(
            self.dataset_name, batch_size=t.batch_size, test_batch_size=t.test_batch_size,
            drop_last=t.drop_last, shuffle=t.shuffle, shuffle_seed=self.seed, **data,
        )
        self.steps_per_epoch = len(self.train_batches)
        torch.manual_seed(self.seed)
        m = self.model_spec
        tables = make_tables(self.spec.sparse_names, self.spec.num_embeddings, m.embedding_dim)
        self.embeddings = build_embeddings(
            self.emb, tables, self.budget, t.sparse_lr, t.sparse_eps, self.steps_per_epoch,
            self.seed, popularity=self._popularity(),
        )
        full_tables = make_tables(self.spec.sparse_names, self.spec.num_embeddings, m.embedding_dim)
        self.full_bytes = sum(tb.num_embeddings * tb.embedding_dim * 4 for tb in full_tables)
        self.model = build_dlrm(self.embeddings, self.spec.num_dense, m.dense_arch, m.over_arch)
        self.dense_optimizer = torch.optim.Adam(dense_parameters(self.model), lr=t.dense_lr)

    def _popularity(self) -> Optional[List[float]]:
        """Mixed-Dimension's per-feature popularity, from the training ids."""
        if self.emb.method != "mixed_dim":
            return None
        from torchrec_fiited.baselines.mixed_dim import feature_popularity

        columns = [torch.cat([b.sparse_features[f].values() for b in self.train_batches])
                   for f in self.spec.sparse_names]
        return feature_popularity(torch.stack(columns, 1).numpy())

    def train(self) -> TrainResult:
        t = self.train_spec
        total = t.steps or t.epochs * self.steps_per_epoch
        result = TrainResult()
        while result.steps < total:
            before = result.steps
            train(self.model, self.train_batches, self.dense_optimizer, max_steps=total,
                  progress=t.progress, result=result, on_step=self._snapshot)
            if result.steps == before:
                break
        return result

    def _snapshot(self, step: int) -> None:
        """Record how FIITED allocated chunks, once per pruning interval."""
        emb = self.embeddings
        if isinstance(emb, FiitedEmbeddingBagCollection) and step % emb.config.prune_interval == 0:
            tables = emb.stats()["tables"]
            self.allocation.append(
                {"step": step, "tables": {n: s["rows_by_live_chunks"] for n, s in tables.items()}}
            )

    def run(self) -> Dict[str, Any]:
        from torchrec_fiited.baselines import BudgetUnreachable

        try:
            self.setup()
        except BudgetUnreachable as e:
            # Recorded, not raised: one unreachable point must not abort a whole sweep.
            out = {"emb": self.cfg.get("emb_name", self.emb.method), "budget": self.budget,
                   "seed": self.seed, "dataset": self.cfg["dataset"]["name"], "infeasible": str(e)}
            self.write(out)
            return out
        result = self.train()
        metrics = evaluate(self.model, self.test_batches)
        out = {
            **{f"test_{k}": float(v) for k, v in metrics.items()},
            "embedding_bytes": embedding_bytes(self.embeddings),
            "embedding_bytes_full": self.full_bytes,
            "budget": self.budget,
            "emb": self.cfg.get("emb_name", self.emb.method),
            "dataset": self.dataset_name,
            "seed": self.seed,
            "steps": result.steps,
            "steps_per_epoch": self.steps_per_epoch,
            "train_seconds": result.seconds,
            "examples_per_second": result.examples_per_second,
            "final_train_loss": float(np.mean(result.losses[-20:])) if result.losses else None,
            "chunk_allocation": self.allocation,
        }
        if isinstance(self.embeddings, FiitedEmbeddingBagCollection):
            out["fiited_stats"] = self.embeddings.stats()
        self.write(out)
        return out

    def write(self, metrics: Dict[str, Any]) -> None:
        """Write metrics.json atomically, so an interrupted run never leaves half a file."""
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "metrics.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, path)
        log.info("wrote %s", path)
