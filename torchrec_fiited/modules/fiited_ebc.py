"""FiitedEmbeddingBagCollection: a drop-in EmbeddingBagCollection backed by a VHPI store."""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_fiited.config import FiitedConfig
from torchrec_fiited.modules import checkpoint, stats
from torchrec_fiited.modules.dim_pruning import run_dim_pruning
from torchrec_fiited.modules.layout_plan import TableShard, plan_pools
from torchrec_fiited.modules.pruning import run_cycle
from torchrec_fiited.modules.batch import Batch, PoolBatch, PoolFeatures, pool_features, resolve_batch
from torchrec_fiited.modules.step_buffers import StepBuffers
from torchrec_fiited.modules.validation import check_kjt
from torchrec_fiited.ops import FusedParams, fused_backward, lookup_forward_batched, lookup_forward_out
from torchrec_fiited.ops.dispatch import positions_equal, positions_in
from torchrec_fiited.optim import FiitedFusedOptimizer
from torchrec_fiited.policy import (
    LocalCoordinator,
    PruneCoordinator,
    cycle_due,
    decision_due,
    record_dim_utilities,
)
from torchrec_fiited.store import VHPIStore


# Ids per fused backward call when tables of a pool are updated together (``_update_groups``).
_GROUP_IDS = 1 << 18


@dataclass
class _PoolMisses:
    """The distinct keys of a pool that stay without an entry after a training forward's
    admission, int64 [G], and the utility each earns in backward, fp32 [G, K]."""

    pool: str
    keys: torch.Tensor
    gains: torch.Tensor


class FiitedEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """EmbeddingBagCollection whose rows are K chunks that are pruned and regrown in training.

    Same contract as TorchRec's ``EmbeddingBagCollection``: for F features with dims D_f, a
    KJT with batch size B gives a ``KeyedTensor`` with the same keys, order and
    ``length_per_key``, values fp32 [B, sum_f D_f]. A pruned chunk contributes zeros.

    Training forward admits entries seen for the first time (see ``VHPIStore.admit``); backward
    applies the fused sparse optimizer to live chunks, adds a * ||g|| to every touched chunk's
    utility (pruned ones too) and runs a pruning cycle every ``prune_interval`` steps. In eval
    mode the module only reads.

    With ``config.dim_pruning`` on (FIITED-2D), backward also adds each column's squared
    output gradient to its table's dimension utility; after the cold start (and at each revisit)
    ``prune_dims`` keeps the best columns of every chunk, the pools shrink to them, and the
    pruned dimensions read as zeros. Not supported with ``shards`` yet.

    Args:
        tables: table configs; every ``embedding_dim`` must be divisible by ``num_chunks``.
        config: FIITED settings.
        device: where the store lives (default CPU).
        is_weighted: pool with the KJT's per-sample weights.
        shards: for a rank's local lookup in a sharded collection: which part of which global
            table each of ``tables`` holds. Budgets, fitted ratios and thresholds then follow
            ``global_tables``, and initial values and samples are keyed by global rows and
            chunks, so the shards behave as one unsharded module would.
        global_tables: the sharded collection's tables (with ``shards``).
        coordinator: combines the pruning-cycle samples of all shards (default: this module only).

    Example::

        tables = [EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100,
                                     feature_names=["f1"]),
                  EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=50,
                                     feature_names=["f2"])]
        ebc = FiitedEmbeddingBagCollection(tables, FiitedConfig(num_chunks=2, budget=0.5))
        #        0       1        2   <- batch
        # f1   [0,1]  None    [2]
        # f2   [3]    [4]     [5,6]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6]),
            lengths=torch.tensor([2, 0, 1, 1, 1, 2]))
        out = ebc(kjt)
        out.values().shape   # torch.Size([3, 12]); out.keys() == ["f1", "f2"]

    Raises:
        RuntimeError: at a training forward in a process group of more than one rank: the
            collection is then replicated (DistributedModelParallel left it unsharded because
            ``fiited_sharders()`` was not passed), unless ``allow_replicated`` is set.
    """

    #: Let a training forward run unsharded on each rank of a process group of several ranks:
    #: every rank then trains its own copy on its own batches. Off by default, as that is almost
    #: always DMP without FIITED's sharder; set it on the instance (``ebc.allow_replicated = True``)
    #: for independent replicas on purpose. Not a ``FiitedConfig`` field: checkpoints compare the
    #: config, and how a copy is placed is not part of its state.
    allow_replicated: bool = False

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        config: FiitedConfig,
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
        shards: Optional[Mapping[str, TableShard]] = None,
        global_tables: Optional[List[EmbeddingBagConfig]] = None,
        coordinator: Optional[PruneCoordinator] = None,
    ) -> None:
        super().__init__()
        device = torch.device(device or "cpu")
        self._config = config
        self._is_weighted = is_weighted
        self._tables = list(tables)
        for t in self._tables:
            if not t.feature_names:
                t.feature_names = [t.name]
        self._features = [(f, t) for t in self._tables for f in t.feature_names]
        self._keys = [f for f, _ in self._features]
        self._dims = [t.embedding_dim for _, t in self._features]
        self._col_of = _column_offsets(self._features)
        if len({f for f, _ in self._features}) != len(self._features):
            raise ValueError(f"a feature may feed only one table: {[f for f, _ in self._features]}")
        plan = plan_pools(self._tables, config, shards, global_tables)
        self._capacities = plan.capacities
        self._policies = plan.policies  # admission quotas of the local pools
        self._logical = plan.logical  # capacities and policies the thresholds are computed for
        self._logical_of = plan.logical_of
        self.store = VHPIStore(
            plan.layouts, plan.sizes, plan.num_chunks, config.optimizer, device, config.seed,
            dim_pruning=config.dim_pruning.enabled, utility_decay=config.decay,
        )
        # Each pool's features in id order, for the table-batched ops (modules/batch.py).
        self._pool_features = pool_features(self._features, self._col_of, self.store.layouts, device)
        self._plain_pools: Dict[str, bool] = {}
        self._coordinator = coordinator or LocalCoordinator()
        self._step_buffers = StepBuffers()  # per-id tensors and the output, reused across forwards
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.int64, device=device))
        self._last_cycle: Dict[str, Dict[str, Any]] = {}
        self._fused_optimizer = FiitedFusedOptimizer(
            dict(self.store.pools.items()), config.optimizer, config.learning_rate,
            config.eps, config.weight_decay,
        )
        # Where backward reads lr etc.; a sharded collection points its lookups at its own handle.
        self._hparams_source = self._fused_optimizer
        self._register_load_state_dict_pre_hook(checkpoint.validate_before_load, with_module=True)

    # ---- EmbeddingBagCollectionInterface -------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        values = _store_lookup(self, features)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=values)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def fused_optimizer(self) -> FiitedFusedOptimizer:
        return self._fused_optimizer

    @property
    def config(self) -> FiitedConfig:
        return self._config

    @property
    def last_cycle(self) -> Dict[str, Dict[str, Any]]:
        """What the last pruning cycle decided per logical pool (step, thresholds, ...)."""
        return self._last_cycle

    # ---- pruning --------------------------------------------------------------------------

    def prune(self) -> Dict[str, Dict[str, Any]]:
        """Run one pruning cycle on every pool now; returns what it decided per logical pool."""
        return run_cycle([self], self._coordinator)

    def prune_dims(self) -> Dict[str, Dict[str, Any]]:
        """Run one FIITED-2D decision now: every pool keeps its tables' best columns and shrinks
        to them. Returns per table the step, D_active, kept columns and regrown chunks.

        Raises:
            ValueError: if ``config.dim_pruning`` is off.
        """
        if not self._config.dim_pruning.enabled:
            raise ValueError("prune_dims needs dim_pruning.target_ratio > 0 in the FiitedConfig")
        return run_dim_pruning(self)

    def stats(self) -> Dict[str, Any]:
        """Per table and in total: entries seen, live chunks per chunk index, thresholds and
        ratios, last cycle's evictions/allocations, and bytes by component (pools, optimizer,
        metadata) that sum to the bytes of the module's tensors."""
        return stats.collect(self)

    # ---- dense import/export ----------------------------------------------------------------

    def load_dense_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        """Start from full tables (e.g. a TorchRec EBC's): every chunk live. Needs budget 1."""
        for name, w in weights.items():
            if name not in self.store.layouts:
                raise ValueError(f"unknown table {name!r}; tables are {list(self.store.layouts)}")
        for name, w in weights.items():
            self.store.load_dense_weights(name, w)

    def dense_weights(self) -> Dict[str, torch.Tensor]:
        """Logical tables fp32 [E, D] with pruned chunks as zeros, by table name."""
        return {name: self.store.dense_weights(name) for name in self.store.layouts}

    # ---- checkpoint state -------------------------------------------------------------------

    def shape_like(self, shapes: Mapping[str, Any]) -> None:
        """Give the FIITED-2D pools the widths of a checkpoint before an in-place load.

        ``load_state_dict`` re-shapes the pools itself; a loader that fills the module's own
        tensors in place (``torch.distributed.checkpoint``) needs them shaped first. ``shapes``
        maps state-dict keys relative to this module to shapes (e.g. DCP metadata sizes); only
        the ``store.dim_maps.<table>.kept`` entries are read.

        Raises:
            ValueError: a width outside [1, chunk_size] or differing within a pool.
        """
        checkpoint.reshape_to(self, shapes)

    def get_extra_state(self) -> Dict[str, Any]:
        return checkpoint.extra_state(self)

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._last_cycle = dict(state["last_cycle"])

    # ---- internals --------------------------------------------------------------------------

    def _resolve(self, features: KeyedJaggedTensor, reuse: bool = False) -> Batch:
        """Each pool's keys and bags (``modules/batch.py``); keys of other modules are ignored,
        and a VBE batch is expanded to its padded equivalent (``modules/vbe.py``). With
        ``reuse`` (the caller releases the batch once done: a training step's backward, an
        inference forward after its lookup), the per-id tensors come from the previous steps'
        buffers (``modules/step_buffers.py``)."""
        B = check_kjt(features, self._keys, self._is_weighted)
        return resolve_batch(features, self._pool_features, B, self._config.hash_ids,
                             self._is_weighted, self._step_buffers if reuse else None)

    def _resolve_entries(self, batch: Batch, admit: bool) -> None:
        """Resolve every pool's keys to entries (the null entry where not resident); with
        ``admit``, first offer the non-resident keys of the batch an entry (``VHPIStore.admit``).

        One probe per id: an id admitted here takes its new entry from the admission, and an id
        whose entry an admission displaced reads the null entry, so no second probe is needed.
        """
        step = int(self.steps_done)
        for pb in batch.pools:
            entries = self.store.entries[pb.pool].lookup(pb.keys, out=pb.per_id())
            if admit:
                entries, pb.update_entries, pb.misses = self._admit(
                    pb.pool, pb.keys, entries, step, pb.per_id())
            pb.entries = entries

    def _admit(self, pool: str, keys: torch.Tensor, entries: torch.Tensor, step: int,
               update: torch.Tensor):
        """Admission of the pool's batch ``keys`` int64 [n] resolved to ``entries`` int64 [n].

        Returns the entries after admission (``entries`` itself, updated in place: the probe's
        fresh output), what the fused backward takes for each id (``PoolBatch.update_entries``,
        written into ``update`` int64 [n]: built here, where the misses are known, so backward
        needs no pass of its own to mark them) and the pool's misses (``_PoolMisses``).
        """
        et = self.store.entries[pool]
        null = et.null_entry
        # A miss's code in the backward: E + its group, scored for the sketch; -1 without one.
        first_group = et.chunk_slots.shape[0] if self.store.sketches[pool].width else None
        miss_at = positions_equal(entries, null)
        unique, inverse = torch.unique(keys[miss_at], return_inverse=True)
        quota = self._policies[pool].admission_quota(self._capacities[pool])
        slots, displaced = self.store.admit(pool, unique, step, quota)
        # Hits whose entry this admission displaced now miss (their slot may hold a new key).
        lost_at = None
        if displaced.numel():
            was_displaced = torch.zeros(null + 1, dtype=torch.bool, device=entries.device)
            was_displaced[displaced] = True
            lost_at = positions_in(entries, was_displaced)
        # The pool's misses after admission: keys still out, then keys that lost their entry.
        # Per distinct key first, then one gather per id (the misses outnumber their keys).
        stay_out = slots < 0
        entry_of_unique = torch.where(stay_out, null, slots)
        entries[miss_at] = entry_of_unique[inverse]
        misses_keys = unique[stay_out]
        if first_group is None:
            update.copy_(entries).masked_fill_(entries == null, -1)
        else:
            update.copy_(entries)
            group_of_unique = torch.cumsum(stay_out, 0) - 1 + first_group
            update[miss_at] = torch.where(stay_out, group_of_unique, entry_of_unique)[inverse]
        if lost_at is not None and lost_at.numel():
            lost_keys, lost_group = torch.unique(keys[lost_at], return_inverse=True)
            entries[lost_at] = null
            update[lost_at] = (-1 if first_group is None
                               else first_group + misses_keys.numel() + lost_group)
            misses_keys = torch.cat([misses_keys, lost_keys])
        gains = torch.zeros(misses_keys.numel(), self.store.num_chunks, device=keys.device)
        return entries, update, _PoolMisses(pool, misses_keys, gains)

    def _plain(self, spec: PoolFeatures) -> bool:
        """Whether a pool's features go through the table-batched ops: no table of it has a
        FIITED-2D column map or a fallback, and all have one width. Fixed at construction (the
        store's dim maps and fallbacks are), so computed once per pool."""
        plain = self._plain_pools.get(spec.pool)
        if plain is None:
            store, tables = self.store, set(spec.tables)
            plain = not any(t in store.dim_maps or t in store.fallbacks for t in tables) and (
                len({store.layouts[t].dim for t in tables}) == 1
            )
            self._plain_pools[spec.pool] = plain
        return plain

    def _update_groups(self, pb: PoolBatch) -> List[Tuple[int, int]]:
        """The feature ranges [first, end) each fused backward call takes: several tables of a
        pool at once (they share the entry table and the chunk pool, so the result is the same
        as table by table), up to ``_GROUP_IDS`` ids per call, or one table where the pool is
        not plain (``_plain``). A pool's features are ordered by table, so a range's ids are
        one slice.

        bench_lookup (8 tables, K=4, budget 0.25): one call per pool took a step at L=1 from
        1.15x to 1.30x TBE, but at L=20 (1.3M ids) from 1.09x to 0.93x: the sort and the
        entries of one table's 164k ids stay in cache, those of 1.3M do not."""
        runs = pb.spec.table_runs()
        if not self._plain(pb.spec):
            return [(first, end) for _, first, end in runs]
        groups: List[Tuple[int, int]] = []
        for _, first, end in runs:
            if groups and pb.id_starts[end] - pb.id_starts[groups[-1][0]] <= _GROUP_IDS:
                groups[-1] = (groups[-1][0], end)  # the run joins the group within the cap
            else:
                groups.append((first, end))
        return groups

    def _pooled(self, batch: Batch) -> torch.Tensor:
        """Pooled values fp32 [B, sum D]: one table-batched op per plain pool, written straight
        into the output's column blocks (no per-feature outputs, no concatenation). With step
        buffers (the module's own forwards), the last output's storage when nothing holds it."""
        B, device = batch.batch_size, self.steps_done.device
        out = (torch.empty(B, sum(self._dims), device=device) if batch.lease is None
               else batch.lease.output((B, sum(self._dims)), torch.float32, device))
        for pb in batch.pools:
            spec = pb.spec
            pool, et = self.store.pools[pb.pool], self.store.entries[pb.pool]
            if self._plain(spec):
                lookup_forward_batched(
                    pool.weights, et.chunk_slots, pb.entries, pb.offsets, pb.weights,
                    spec.feature_cols, spec.feature_mean, out,
                )
                continue
            for f, (feature, table) in enumerate(zip(spec.features, spec.tables)):
                ids = pb.ids(f, f + 1)
                offsets = pb.feature_offsets(f)
                weights = None if pb.weights is None else pb.weights[ids]
                mean = bool(spec.feature_mean[f])
                col, D = self._col_of[feature], self.store.layouts[table].dim
                block = out[:, col : col + D]
                stored = self.store.stored_columns(table)  # None: whole chunks, write in place
                target = block if stored is None else out.new_empty(B, stored.numel())
                lookup_forward_out(pool.weights, et.chunk_slots, pb.entries[ids], offsets, weights,
                                   mean, target)
                if stored is not None:  # FIITED-2D: [B, D_active] into D columns, pruned ones zero
                    block.zero_()
                    block.index_copy_(1, stored, target)
                if table in self.store.fallbacks:  # miss="hashed": ids without an entry
                    miss = pb.entries[ids] == et.null_entry
                    if bool(miss.any()):
                        block += self.store.fallbacks[table].pooled(
                            pb.keys[ids], miss, offsets, weights, mean
                        )
        return out

    def _fused_backward(self, batch: Batch, grad: torch.Tensor) -> None:
        self._apply_gradients(batch, grad)
        batch.release()  # its per-id buffers serve the next step
        self._end_step()

    def _end_step(self) -> None:
        self.steps_done += 1
        cfg = self._config
        # Dimensions first, so a cycle at the same step already allocates narrow chunks.
        if decision_due(int(self.steps_done), cfg.dim_pruning):
            self.prune_dims()
        if cycle_due(int(self.steps_done), cfg.schedule, cfg.prune_interval, cfg.warmup_steps):
            self.prune()

    def _fused_params(self) -> FusedParams:
        hp = self._hparams_source.param_groups[0]
        return FusedParams(
            hp["optimizer"], hp["lr"], hp["eps"], hp["weight_decay"], self._config.utility,
            self._config.decay, int(self.steps_done),
        )

    def _flush_fallbacks(self, every_edge: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """One optimizer step per hashed-fallback row touched since the last flush (``every_edge``:
        per table whose rows are split over ranks, every shard's edge buckets; see
        ``HashedFallback.flush``)."""
        params = self._fused_params()
        for name, fb in self.store.fallbacks.items():
            fb.flush(params, None if every_edge is None else every_edge.get(name))

    def _apply_gradients(self, batch: Batch, grad: torch.Tensor, flush: bool = True) -> None:
        """Optimizer step on live chunks and utility update on all touched chunks, per pool (and,
        with ``flush``, on the hashed fallbacks' rows; else at ``_flush_fallbacks``)."""
        params = self._fused_params()
        B, W = grad.shape
        for pb in batch.pools:
            spec = pb.spec
            et, pool = self.store.entries[pb.pool], self.store.pools[pb.pool]
            id_scale_all = pb.id_scale()
            D0 = self.store.layouts[spec.tables[0]].dim
            groups = self._update_groups(pb)
            # A pool updated in one call whose blocks are whole D-wide rows of the gradient
            # reads it in place (bench_lookup L=1, 26 tables: stacking the blocks cost 14 ms of
            # a 63 ms step). Split into groups (many ids), each group's stacked copy is compact
            # and stays in cache: 1.11-1.15x vs 1.06x TBE in place (L=20, 8 tables).
            in_place = len(groups) == 1 and self._plain(spec) and W % D0 == 0 and all(
                c % D0 == 0 for c in spec.columns
            )
            if in_place:
                grad_view, row_all = grad.view(-1, D0), pb.grad_row_of_id(W, D0)
            else:
                bag_of_id = pb.bag_of_id()
            for first, end in groups:
                table = spec.tables[first]  # the group's only table unless the pool is plain
                D = self.store.layouts[table].dim
                ids = pb.ids(first, end)
                if in_place:
                    grad_rows, rows = grad_view, row_all[ids]
                else:
                    # Stack the group's features' output gradients [F_g * B, D]; id i of
                    # feature first + j reads row j * B + bag(i).
                    grad_rows = torch.cat([
                        grad[:, self._col_of[f] : self._col_of[f] + D]
                        for f in spec.features[first:end]
                    ])
                    rows = bag_of_id[ids] - first * B
                grad_full = grad_rows
                if table in self.store.dim_maps:  # FIITED-2D: every column scores, stored ones update
                    dims = self.store.dim_maps[table]
                    record_dim_utilities(dims.utilities, grad_rows, self._config.dim_pruning.decay)
                    grad_rows = self.store.narrow(table, grad_rows)
                id_scale = None if id_scale_all is None else id_scale_all[ids]
                # Ids with an entry: optimizer and utilities. Ids without: their utility for the
                # sketch, by group (one per key), as entries E + group of the same call (one sort
                # for both; bench_lookup L=20, budget 0.01: two passes sorted every id twice).
                # Never the null entry itself: it would be one segment of every miss, a serial
                # sum on one thread. Without a sketch no id is coded E + g (``_admit``), so the
                # gains are passed and stay untouched.
                fused_backward(
                    grad_rows, rows, id_scale, pb.update_entries[ids], et.chunk_slots,
                    et.utilities, pool.weights, pool.momentum, params,
                    et.addition_scale(params.step), pb.misses.gains,
                )
                miss = None if table not in self.store.fallbacks else (
                    pb.entries[ids] == et.null_entry)
                if miss is not None and bool(miss.any()):
                    keys = pb.keys[ids][miss]
                    g = grad_full[rows[miss]]  # every column: the fallback stores them all
                    if id_scale is not None:
                        g = g * id_scale[miss].unsqueeze(1)
                    self.store.fallbacks[table].accumulate(keys, g)
            # One sketch update per pool, with every table's misses.
            sketch = self.store.sketches[pb.pool]
            if pb.misses is not None and sketch.width and pb.misses.keys.numel():
                sketch.add(pb.misses.keys, pb.misses.gains)
        if flush:
            self._flush_fallbacks()


@torch.fx.wrap
@torch.compiler.disable
def _store_lookup(module: FiitedEmbeddingBagCollection, features: KeyedJaggedTensor) -> torch.Tensor:
    """Pooled values fp32 [B, sum D] of ``features``; in training also admits new entries and
    hooks the fused update (and pruning cycles) into backward.

    Runs eagerly under torch.compile, as one opaque region: admission (a unique over the
    never-seen ids), the in-backward update and the cycles change the store by data-dependent
    amounts, so dynamo would break the graph at each of them (31 breaks in a DLRM) and recompile
    per table; eagerly, the store stays bitwise what eager training gives. The model around it
    compiles. An FX leaf for the same reason.
    """
    batch = module._resolve(features, reuse=True)  # every check before the store is touched
    if module.training and torch.is_grad_enabled():
        _check_not_replicated(module)
        module._resolve_entries(batch, admit=True)
        anchor = torch.zeros((), requires_grad=True)  # makes autograd call our backward
        return _FusedLookup.apply(module, batch, anchor)
    module._resolve_entries(batch, admit=False)
    out = module._pooled(batch)
    batch.release()  # nothing reads an inference batch after its lookup
    return out


def _check_not_replicated(module: FiitedEmbeddingBagCollection) -> None:
    """Refuse to train an unsharded collection on one rank of several.

    DistributedModelParallel shards only the module types its sharders name; with torchrec's
    default sharders it leaves this collection whole on every rank and wraps the model in DDP,
    which syncs parameters only (``broadcast_buffers=False``). FIITED's tables are buffers updated
    in backward, so each rank would train its own copy on its own batches and the copies drift
    apart, silently (0.084 apart after 3 steps on 2 ranks, issue 13).

    Raises:
        RuntimeError: when torch.distributed is initialized with world_size > 1 and
            ``module.allow_replicated`` is not set.
    """
    if module.allow_replicated or not dist.is_available() or not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    if world_size > 1:
        raise RuntimeError(
            f"FiitedEmbeddingBagCollection is training unsharded on rank {dist.get_rank()} of "
            f"{world_size}: every rank would update its own copy of the tables and the copies "
            "would drift apart (DistributedModelParallel leaves module types its sharders do not "
            "name unsharded, and DDP does not sync FIITED's in-backward updates). Pass "
            "sharders=torchrec_fiited.fiited_sharders() to DistributedModelParallel and to its "
            "planner (torchrec_fiited.make_fiited_planner(...).collective_plan(model, "
            "fiited_sharders(), pg)); to train independent replicas on purpose, set "
            "allow_replicated = True on the module"
        )


def _column_offsets(features) -> Dict[str, int]:
    """Column where each feature's block starts in the [B, sum D] output."""
    cols, offset = {}, 0
    for feature, table in features:
        cols[feature] = offset
        offset += table.embedding_dim
    return cols


class _FusedLookup(torch.autograd.Function):
    """Forward: pooled lookup. Backward: the fused update; no gradient leaves the module."""

    @staticmethod
    def forward(ctx, module, batch, anchor):  # type: ignore[override]
        ctx.module = module
        ctx.batch = batch
        return module._pooled(batch)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.batch is None:
            raise RuntimeError(
                "[torchrec_fiited] backward ran twice through one FiitedEmbeddingBagCollection "
                "forward (retain_graph=True): its fused update was already applied, and the "
                "batch's buffers now serve later steps"
            )
        batch, ctx.batch = ctx.batch, None
        ctx.module._fused_backward(batch, grad.contiguous())
        return None, None, None
