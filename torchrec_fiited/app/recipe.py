"""The training recipe: setup -> (load_checkpoint) -> train -> evaluate -> write metrics.json.

Flat on purpose (torchtune's recipe shape): the library does the work, this wires it together.
One code path for one process and for ``torchrun``: with W > 1 processes every rank trains on its
slice of each global batch, the tables are sharded by torchrec's DMP, the test predictions are
gathered so the metrics cover the whole test set, and rank 0 writes metrics.json.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper

from torchrec_fiited.app import parallel
from torchrec_fiited.app.batches import TrainBatches, eval_batches
from torchrec_fiited.app.checkpoint import (
    Checkpointer, check_compatible, read_meta, rng_state, set_rng_state,
)
from torchrec_fiited.app.embeddings import (
    FIITED_METHODS, SINGLE_PROCESS_METHODS, EmbeddingSpec, build_embeddings, embedding_bytes,
    fused_optimizer, local_shard_bytes,
)
from torchrec_fiited.app.loop import TrainResult, predict, train
from torchrec_fiited.app.metrics import compute_metrics
from torchrec_fiited.app.model import build_dlrm, dense_named_parameters, make_tables
from torchrec_fiited.app.sharding import shard_model
from torchrec_fiited.app.specs import ModelSpec, TrainSpec
from torchrec_fiited.data.registry import load_arrays

log = logging.getLogger(__name__)

__all__ = ["ModelSpec", "TrainSpec", "TrainRecipe", "StopRequested"]


class StopRequested(Exception):
    """``train.stop_after_steps`` steps are done (raised between steps, after any checkpoint)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step} (train.stop_after_steps)")
        self.step = step


@dataclass
class DataPosition:
    """Where the next training batch comes from: global batch ``batch_in_epoch`` of ``epoch``."""

    epoch: int = 0
    batch_in_epoch: int = 0


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
        self.env = parallel.DistEnv()
        self.allocation: List[Dict[str, Any]] = []
        # Per pruning cycle: step and each logical pool's thresholds (this rank's view).
        self.cycles: List[Dict[str, Any]] = []
        self.result = TrainResult()
        self.position = DataPosition()
        self.sharding_plan: Dict[str, Dict[str, Any]] = {}
        self.resumed_from_step: Optional[int] = None

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.env = parallel.init_distributed()
        if self.env.is_distributed and self.emb.method in SINGLE_PROCESS_METHODS:
            raise ValueError(
                f"emb={self.emb.method} does not run distributed (no sharder for its re-indexed "
                "or projected tables); launch it as a single process"
            )
        # Hydra names the output dir per process (${now}); rank 0's is the run's.
        self.output_dir = parallel.broadcast_from_main(self.env, self.output_dir)
        self._setup_data()
        self._setup_model()
        t = self.train_spec
        root = t.checkpoint_dir or os.path.join(self.output_dir, "checkpoints")
        self.checkpointer = Checkpointer(os.path.abspath(root), self.env)

    def _setup_data(self) -> None:
        t, env = self.train_spec, self.env
        data = dict(self.cfg["dataset"])
        self.dataset_name = data.pop("name")
        train_arrays, self.test_arrays, self.spec = load_arrays(self.dataset_name, **data)
        self.train_data = TrainBatches(
            train_arrays, self.spec.sparse_names, t.batch_size, env.rank, env.world_size,
            shuffle=t.shuffle, seed=self.seed, drop_last=t.drop_last, device=env.device,
        )
        self.steps_per_epoch = len(self.train_data)

    def _setup_model(self) -> None:
        t, m = self.train_spec, self.model_spec
        torch.manual_seed(self.seed)
        tables = make_tables(self.spec.sparse_names, self.spec.num_embeddings, m.embedding_dim)
        # The unpruned collection's bytes: fp32 weights plus the full method's optimizer state
        # (rowwise Adagrad, one float per row), so emb=full measures a 1.0x reduction.
        self.full_bytes = sum(tb.num_embeddings * (tb.embedding_dim + 1) * 4 for tb in tables)
        self.embeddings = build_embeddings(
            self.emb, tables, self.budget, t.sparse_lr, t.sparse_eps, self.steps_per_epoch,
            self.seed, popularity=self._popularity(), counts=self._train_counts(),
        )
        self.model = build_dlrm(self.embeddings, self.spec.num_dense, m.dense_arch, m.over_arch)
        if self.env.is_distributed:
            self.model, self.sharding_plan = shard_model(
                self.model, self.embeddings, self.env, self.train_data.local_batch_size,
                t.sharding_type,
            )
            self.embeddings = self.model.module.sparse_arch.embedding_bag_collection
            self.fused_optimizer = self.model.fused_optimizer
        else:
            self.fused_optimizer = fused_optimizer(self.embeddings)
        self.dense_optimizer = KeyedOptimizerWrapper(
            dense_named_parameters(self.model), lambda ps: torch.optim.Adam(ps, lr=t.dense_lr)
        )

    def _popularity(self) -> Optional[List[float]]:
        """Mixed-Dimension's per-feature popularity, from the training ids."""
        if self.emb.method != "mixed_dim":
            return None
        from torchrec_fiited.baselines.mixed_dim import feature_popularity

        return feature_popularity(self.train_data.arrays.sparse)

    def _train_counts(self) -> Optional[Dict[str, np.ndarray]]:
        """The frequency oracle's training count per id, per feature."""
        if self.emb.method != "freq_oracle":
            return None
        from torchrec_fiited.baselines.freq_oracle import feature_counts

        return feature_counts(self.train_data.arrays.sparse, self.spec.sparse_names)

    # ---- training ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        t = self.train_spec
        total = t.steps or t.epochs * self.steps_per_epoch
        reduce_loss = (lambda loss: parallel.mean_over_ranks(self.env, loss)) \
            if self.env.is_distributed else None
        while self.result.steps < total:
            before = self.result.steps
            batches = self.train_data.epoch(self.position.epoch, self.position.batch_in_epoch)
            train(self.model, batches, self.dense_optimizer, max_steps=total,
                  progress=t.progress and self.env.is_main, result=self.result,
                  on_step=self._after_step, reduce_loss=reduce_loss)
            if self.result.steps == before:
                break
        return self.result

    def _after_step(self, step: int) -> None:
        """Advance the data position, snapshot, checkpoint if due, stop if asked."""
        pos = self.position
        pos.batch_in_epoch += 1
        if pos.batch_in_epoch == self.steps_per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        self._snapshot(step)
        t = self.train_spec
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            self.save_checkpoint()
        if t.stop_after_steps is not None and step >= t.stop_after_steps:
            raise StopRequested(step)

    def _snapshot(self, step: int) -> None:
        """Record how FIITED allocated chunks, once per pruning interval.

        Unsharded modules only for now: a sharded one's stats are per rank and per sharding type.
        """
        emb = self.embeddings
        cycle = getattr(emb, "last_cycle", None)
        if cycle:
            at = max(int(r["step"]) for r in cycle.values())
            if not self.cycles or self.cycles[-1]["step"] != at:
                self.cycles.append(
                    {"step": at, "thresholds": {p: r["thresholds"] for p, r in sorted(cycle.items())}}
                )
        if not (hasattr(emb, "stats") and hasattr(emb, "config")):
            return
        if step % emb.config.prune_interval == 0:
            tables = emb.stats()["tables"]
            self.allocation.append(
                {"step": step, "tables": {n: s["rows_by_live_chunks"] for n, s in tables.items()}}
            )

    # ---- checkpoints -------------------------------------------------------------------------

    def _checkpoint_state(self) -> Dict[str, Any]:
        """What a checkpoint holds, shaped for DCP's in-place load.

        ``trainer`` is the same on every rank (DCP stores it once); ``rank_<r>`` is per rank.
        The allocation log goes in as JSON text: DCP loads into the live structure, and a list
        of dicts would need as many entries before the load as it had when saved.
        """
        state = {
            "model": self.model.state_dict(),
            "dense_optimizer": self.dense_optimizer.state_dict(),
            "trainer": {"step": self.result.steps, "epoch": self.position.epoch,
                        "batch_in_epoch": self.position.batch_in_epoch,
                        "global_losses": list(self.result.global_losses)},
            f"rank_{self.env.rank}": {"rng": rng_state(self.env.device),
                                      "losses": list(self.result.losses),
                                      "allocation": json.dumps(self.allocation),
                                      "cycles": json.dumps(self.cycles)},
        }
        if self.fused_optimizer is not None:
            state["fused_optimizer"] = self.fused_optimizer.state_dict()
        return state

    def _run_signature(self) -> Dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        return {"world_size": self.env.world_size, "batch_size": self.train_spec.batch_size,
                "emb": self.cfg.get("emb_name", self.emb.method), "budget": self.budget,
                "dataset": self.dataset_name, "seed": self.seed}

    def save_checkpoint(self) -> str:
        return self.checkpointer.save(self.result.steps, self._checkpoint_state(),
                                      self._run_signature())

    def load_checkpoint(self) -> None:
        """Continue from the newest complete checkpoint, if there is one."""
        path = self.checkpointer.latest()
        if path is None:
            log.warning("train.resume: no checkpoint under %s; starting fresh", self.checkpointer.root)
            return
        meta, run = read_meta(path), self._run_signature()
        # FIITED's sparse state reshards (distributed/reshard.py): another world size resumes.
        reshard = meta.get("world_size") != run["world_size"] and self.emb.method in FIITED_METHODS
        check_compatible(path, meta, {k: v for k, v in run.items()
                                      if not (reshard and k == "world_size")})
        self.dense_optimizer.init_state()  # Adam's state appears at its first step; DCP loads in place
        self._shape_embeddings_like(path)
        state = self._checkpoint_state()
        mine = f"rank_{self.env.rank}"
        if reshard:
            prefix = self._embeddings_prefix(state["model"])
            inner = prefix[len("model."):]
            # The collection keeps its own (fresh) state until load_resharded.
            own = {k: v for k, v in state["model"].items() if k.startswith(inner)}
            state["model"] = {k: v for k, v in state["model"].items() if k not in own}
            # The fused optimizer's state is per chunk, in the collection (hyper-parameters
            # come from this run's config); a new rank takes a saved rank's progress record.
            state.pop("fused_optimizer", None)
            source = f"rank_{self.env.rank % int(meta['world_size'])}"
            state[source] = state.pop(mine)
            mine = source
        self.checkpointer.load(path, state)
        self.model.load_state_dict({**own, **state["model"]} if reshard else state["model"])
        self.dense_optimizer.load_state_dict(state["dense_optimizer"])
        if self.fused_optimizer is not None and "fused_optimizer" in state:
            self.fused_optimizer.load_state_dict(state["fused_optimizer"])
        if reshard:
            from torchrec_fiited.distributed.reshard import load_resharded

            load_resharded(self.embeddings, path, prefix)
            log.info("resharded %s from %s to %d processes", path, meta["world_size"],
                     self.env.world_size)
        self._restore_progress(state["trainer"], state[mine])
        self.resumed_from_step = self.result.steps
        log.info("resumed from %s (step %d)", path, self.result.steps)

    def _embeddings_prefix(self, model_state: Dict[str, Any]) -> str:
        """The embedding collection's key prefix in the checkpoint ("model.<path>."), from the
        model's state-dict keys: they drop DMP's and DDP's wrapper names, so it is found by key."""
        longest = max(self.embeddings.state_dict(), key=len)
        key = next(k for k in model_state if k.endswith("." + longest))
        return "model." + key[: -len(longest)]

    def _shape_embeddings_like(self, path: str) -> None:
        """DCP loads into the module's own tensors, so FIITED-2D pools that had shrunk when the
        checkpoint was written must take its widths before the state is templated."""
        if not hasattr(self.embeddings, "shape_like"):
            return
        # Only an unsharded collection reshapes, so its module path is its key prefix.
        name = next(n for n, m in self.model.named_modules() if m is self.embeddings)
        prefix = f"model.{name}."
        saved = self.checkpointer.metadata(path)
        self.embeddings.shape_like(
            {k[len(prefix):]: m.size for k, m in saved.items() if k.startswith(prefix) and hasattr(m, "size")}
        )

    def _restore_progress(self, trainer: Dict[str, Any], mine: Dict[str, Any]) -> None:
        self.result = TrainResult(steps=int(trainer["step"]), losses=list(mine["losses"]),
                                  global_losses=list(trainer["global_losses"]))
        self.position = DataPosition(int(trainer["epoch"]), int(trainer["batch_in_epoch"]))
        self.allocation = json.loads(mine["allocation"])
        self.cycles = json.loads(mine["cycles"])
        set_rng_state(mine["rng"], self.env.device)

    def _refuse_stale_checkpoints(self) -> None:
        """A fresh run must not mix its checkpoints with an earlier run's."""
        latest = self.checkpointer.latest() if self.train_spec.checkpoint_every else None
        if latest is not None:
            raise ValueError(
                f"{self.checkpointer.root} already holds checkpoints of an earlier run "
                f"(latest {latest}); pass train.resume=true to continue it, "
                "or use another hydra.run.dir or train.checkpoint_dir"
            )

    # ---- evaluation and report ---------------------------------------------------------------

    def evaluate(self) -> Tuple[Dict[str, float], int]:
        """Metrics over the whole test set (every rank's predictions gathered) and its size."""
        env = self.env
        batches = eval_batches(self.test_arrays, self.spec.sparse_names,
                               self.train_spec.test_batch_size, env.rank, env.world_size, env.device)
        rows = parallel.all_gather_rows(env, predict(self.model, batches))
        real = rows[rows[:, 2] > 0]
        return compute_metrics(real[:, 0], real[:, 1], from_logits=True), int(real.shape[0])

    def _embedding_bytes(self) -> int:
        if self.env.is_distributed:
            return parallel.sum_over_ranks(self.env, local_shard_bytes(self.embeddings))
        return embedding_bytes(self.embeddings)

    def report(self, result: TrainResult) -> Dict[str, Any]:
        metrics, test_examples = self.evaluate()
        out = {
            **{f"test_{k}": float(v) for k, v in metrics.items()},
            "test_examples": test_examples,
            "embedding_bytes": self._embedding_bytes(),
            "embedding_bytes_full": self.full_bytes,
            "budget": self.budget,
            "emb": self.cfg.get("emb_name", self.emb.method),
            "dataset": self.dataset_name,
            "seed": self.seed,
            "dataset_seed": self.cfg["dataset"].get("seed"),
            "world_size": self.env.world_size,
            "sharding_plan": self.sharding_plan,
            "steps": result.steps,
            "steps_per_epoch": self.steps_per_epoch,
            "resumed_from_step": self.resumed_from_step,
            "train_seconds": result.seconds,
            # Ranks step in lockstep, so the run's throughput is W times one rank's.
            "examples_per_second": result.examples_per_second * self.env.world_size,
            "final_train_loss": float(np.mean(result.global_losses[-20:])) if result.global_losses else None,
            "train_losses": result.losses,
            "train_losses_global": result.global_losses,
            "chunk_allocation": self.allocation,
        }
        if hasattr(self.embeddings, "stats"):
            key = "fiited_stats_rank0" if self.env.is_distributed else "fiited_stats"
            out[key] = self.embeddings.stats()
        if self.cycles:
            every = parallel.gather_objects(self.env, self.cycles)
            out["cycle_thresholds"] = self.cycles
            # Coordinated decisions: every rank computed the same thresholds at every cycle.
            out["thresholds_identical_across_ranks"] = all(c == every[0] for c in every)
        return out

    def run(self) -> Dict[str, Any]:
        """Setup, resume if asked, train, evaluate; rank 0 writes metrics.json.

        Returns:
            The metrics (on every rank), ``{"stopped_at_step": n}`` after
            ``train.stop_after_steps``, or ``{"infeasible": ...}`` for an unreachable budget.
        """
        from torchrec_fiited.baselines import BudgetUnreachable

        try:
            try:
                self.setup()
            except BudgetUnreachable as e:
                # Recorded, not raised: one unreachable point must not abort a whole sweep.
                out = {"emb": self.cfg.get("emb_name", self.emb.method), "budget": self.budget,
                       "seed": self.seed, "dataset": self.cfg["dataset"]["name"], "infeasible": str(e)}
                self.write(out)
                return out
            if self.train_spec.resume:
                self.load_checkpoint()
            else:
                self._refuse_stale_checkpoints()
            try:
                result = self.train()
            except StopRequested as stop:
                log.info("%s", stop)
                return {"stopped_at_step": stop.step}
            out = self.report(result)
            self.write(out)
            return out
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        parallel.close_distributed(self.env)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def write(self, metrics: Dict[str, Any]) -> None:
        """Write metrics.json atomically (rank 0 only), so an interrupted run never leaves half a
        file."""
        if not self.env.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, "metrics.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, path)
        log.info("wrote %s", path)
