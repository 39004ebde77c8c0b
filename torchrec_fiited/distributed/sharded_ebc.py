"""ShardedFiitedEmbeddingBagCollection: the per-rank FIITED module DistributedModelParallel runs.

TorchRec's table-, row- and column-wise pooled shardings provide the input dist (KJT
all-to-all, row bucketization) and the output dist (pooled all-to-all or reduce-scatter); the
rank's lookup is a ``FiitedEmbeddingBagCollection`` over its shards, one per sharding type.
Admission, lookups, the fused update and pruning cycles all run in compute/backward, never in
input_dist, so ``TrainPipelineSparseDist`` can run the next batch's input dist early.
"""

from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionAwaitable,
    EmbeddingBagCollectionContext,
)
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingTableConfig, PoolingType
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_fiited.distributed.local_lookups import (
    Part,
    build_local_lookups,
    column_order,
    resolve,
    to_hash_ranges,
)
from torchrec_fiited.distributed.logical_state import LogicalStateMixin
from torchrec_fiited.distributed.mean_pooling import bag_lengths, divide_by_bag_length
from torchrec_fiited.distributed.optimizer import ShardedFiitedOptimizer
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.modules.pruning import run_cycle
from torchrec_fiited.modules.validation import check_ids, vbe_batch_size
from torchrec_fiited.modules.vbe import written_out
from torchrec_fiited.policy import ProcessGroupCoordinator, cycle_due
from torchrec_fiited.store import HashedFallback, hash_ids

_SHARDINGS = {
    ShardingType.TABLE_WISE.value: lambda infos, env, device, codecs: TwPooledEmbeddingSharding(
        infos, env, device, qcomm_codecs_registry=codecs
    ),
    ShardingType.ROW_WISE.value: lambda infos, env, device, codecs: RwPooledEmbeddingSharding(
        infos, env, device, qcomm_codecs_registry=codecs
    ),
    # permute_embeddings: the output holds each table's column shards side by side, in order.
    ShardingType.COLUMN_WISE.value: lambda infos, env, device, codecs: CwPooledEmbeddingSharding(
        infos, env, device, permute_embeddings=True, qcomm_codecs_registry=codecs
    ),
}


class ShardedFiitedEmbeddingBagCollection(
    LogicalStateMixin,
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, EmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """The sharded form of a ``FiitedEmbeddingBagCollection`` (built by its sharder).

    Each rank's pools hold its shards' share of the budget; every ``prune_interval`` steps the
    ranks all-gather sampled utilities over a CPU process group and apply the same global
    thresholds to their own pools. ``state_dict`` holds each shard's resident rows in the sparse
    form of ``store/logical.py`` (``distributed/logical_state.py``): nothing in it scales with
    ``num_embeddings``, and ``torch.distributed.checkpoint`` resumes it bitwise in the same plan.

    MEAN-pooled tables planned row-wise pool SUM on each rank (a rank sees only part of a
    bag); the output is divided by the whole bag's length, taken from the input before routing.

    As torchrec's ``ShardedEmbeddingBagCollection``, the collection routes only its own features
    of the input KJT (keys of other modules are dropped, in any order, batch by batch). A
    variable-batch (VBE) KJT with ``inverse_indices`` is written out as its padded batch before
    routing (row b of feature f gets bag ``inverse_indices[f, b]``), so it pools and trains as
    the unsharded module does with VBE, but sends the padded bags.

    Raises:
        ValueError: for a sharding type other than table/row/column-wise, or a column shard that
            does not hold whole chunks.
    """

    def __init__(
        self,
        module: FiitedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._env = env
        self._device = torch.device(device or "cpu")
        self._module_fqn = module_fqn
        self._config = module.config
        self._is_weighted = module.is_weighted()
        self._tables: List[EmbeddingBagConfig] = list(module.embedding_bag_configs())
        self._table_by_name = {t.name: t for t in self._tables}
        self._parameter_sharding = dict(table_name_to_parameter_sharding)
        self._feature_table = {f: t for t in self._tables for f in t.feature_names}
        infos = self._sharding_infos()
        # Features whose bags are split over ranks but must be averaged: pooled as SUM locally,
        # divided after the reduce-scatter.
        # Row-wise tables are split by hash range: their ids travel permuted (local_lookups).
        self._hash_range_rows = {
            f: t.num_embeddings
            for t in self._tables if self._row_wise(t.name) for f in t.feature_names
        }
        self._split_mean_features = [
            f for t in self._tables for f in t.feature_names
            if t.pooling == PoolingType.MEAN and self._row_wise(t.name)
        ]
        self._sharding_types = list(infos)
        self._embedding_shardings: List[EmbeddingSharding] = [
            _SHARDINGS[st](infos[st], env, self._device, qcomm_codecs_registry) for st in infos
        ]
        # Samples travel on their own CPU group, so a cycle in backward never interleaves with
        # the embedding all-to-alls or DDP's all-reduces on the default group.
        group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        coordinator = ProcessGroupCoordinator(group)
        # One lookup per (sharding, chunks per shard): a store holds one K, and column shards
        # of tables with different dims can hold different numbers of chunks.
        split_mean = {self._feature_table[f].name for f in self._split_mean_features}
        lookups: List[FiitedEmbeddingBagCollection] = []
        self._parts: List[List[Part]] = []
        self._column_order: List[Optional[torch.Tensor]] = []
        for sharding in self._embedding_shardings:
            parts = []
            for lookup, part in build_local_lookups(
                sharding, self._tables, self._config, self._device, self._is_weighted, split_mean,
                coordinator, len(lookups),
            ):
                lookups.append(lookup)
                parts.append(part)
            self._parts.append(parts)
            order = column_order(parts)
            self._column_order.append(None if order is None else order.to(self._device))
        self._lookups = nn.ModuleList(lookups)
        self._output_dists = nn.ModuleList(
            [s.create_output_dist(device=self._device) for s in self._embedding_shardings]
        )
        self._embedding_names = [n for s in self._embedding_shardings for n in s.embedding_names()]
        self._embedding_dims = [d for s in self._embedding_shardings for d in s.embedding_dims()]
        self._input_dists = nn.ModuleList()
        self._has_uninitialized_input_dist = True
        # The routed KJT's keys: every sharding's features, in sharding order.
        self._feature_names = [f for s in self._embedding_shardings for f in s.feature_names()]
        self._feature_splits = [len(s.feature_names()) for s in self._embedding_shardings]
        self._fused_optimizer = ShardedFiitedOptimizer(self._tables, module.fused_optimizer)
        for lookup in self._lookups:
            lookup._hparams_source = self._fused_optimizer
        self._coordinator = coordinator

    # ---- construction -----------------------------------------------------------------------

    def _sharding_infos(self) -> Dict[str, List[EmbeddingShardingInfo]]:
        infos: Dict[str, List[EmbeddingShardingInfo]] = {}
        for t in self._tables:
            ps = self._parameter_sharding.get(t.name)
            if ps is None:
                raise ValueError(f"table {t.name!r} has no entry in the sharding plan")
            if ps.sharding_type not in _SHARDINGS:
                raise ValueError(
                    f"table {t.name!r}: sharding type {ps.sharding_type!r} is not supported; "
                    f"use one of {sorted(_SHARDINGS)}"
                )
            config = EmbeddingTableConfig(
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                name=t.name,
                data_type=t.data_type,
                feature_names=list(t.feature_names),
                pooling=t.pooling,
                is_weighted=self._is_weighted,
                has_feature_processor=False,
                embedding_names=list(t.feature_names),
                weight_init_max=t.weight_init_max,
                weight_init_min=t.weight_init_min,
            )
            # Only the meta tensor's shape and strides are read (shard metadata).
            proxy = torch.empty(t.num_embeddings, t.embedding_dim, device="meta")
            infos.setdefault(ps.sharding_type, []).append(
                EmbeddingShardingInfo(config, ps, proxy, {})
            )
        return infos

    def _row_wise(self, table: str) -> bool:
        return self._parameter_sharding[table].sharding_type == ShardingType.ROW_WISE.value

    def _create_input_dist(self) -> None:
        for sharding in self._embedding_shardings:
            self._input_dists.append(sharding.create_input_dist())

    # ---- ShardedModule --------------------------------------------------------------------

    def create_context(self) -> EmbeddingBagCollectionContext:
        return EmbeddingBagCollectionContext()

    def input_dist(
        self, ctx: EmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        features = self._checked(features)
        if self._has_uninitialized_input_dist:
            self._create_input_dist()
            self._has_uninitialized_input_dist = False
        with torch.no_grad():
            if self._split_mean_features:
                ctx.divisor = bag_lengths(features, self._split_mean_features)
            awaitables = []
            for input_dist, part in zip(self._input_dists, features.split(self._feature_splits)):
                awaitables.append(input_dist(part))
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=part.stride_per_key(),
                        variable_batch_per_feature=part.variable_stride_per_key(),
                    )
                )
        return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn, self._sharding_types)

    def _checked(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT to route: the collection's features in sharding order (other keys dropped, a
        VBE batch written out), global ids validated (or hashed, with ``hash_ids``): a bad id
        must fail here, naming its feature, not inside another rank's lookup.

        Raises:
            ValueError: missing features, weights that disagree with ``is_weighted``, a VBE KJT
                without inverse indices for the collection's features, ids out of range.
        """
        keys = list(features.keys())
        missing = [f for f in self._feature_names if f not in keys]
        if missing:
            raise ValueError(
                f"the KJT lacks the collection's features: missing {missing} (KJT keys {keys}, "
                f"collection features {self._feature_names}; keys of other modules are ignored)"
            )
        if self._is_weighted != (features.weights_or_none() is not None):
            raise ValueError(f"the collection is_weighted={self._is_weighted}, the KJT disagrees")
        if features.variable_stride_per_key():
            # TorchRec's pooled output dists would expect per-feature, per-source-rank bags of a
            # VBE batch; the FIITED lookups pool a fixed [B, sum D] batch, so write it out here.
            vbe_batch_size(features, self._feature_names)  # refuses one without inverse indices
            features = written_out(features, self._feature_names)
        elif keys != self._feature_names:
            features = features.permute([keys.index(f) for f in self._feature_names])
        keys = self._feature_names
        values, lengths = features.values(), features.lengths()
        per_key = features.length_per_key()
        if self._config.hash_ids:
            parts = []
            for key, ids in zip(keys, torch.split(values, per_key)):
                parts.append(hash_ids(ids, self._feature_table[key].num_embeddings))
            values = torch.cat(parts) if parts else values.to(torch.int64)
            features = KeyedJaggedTensor(keys, values, features.weights_or_none(), lengths=lengths)
        else:
            for key, ids in zip(keys, torch.split(values, per_key)):
                t = self._feature_table[key]
                check_ids(key, t.name, ids.to(torch.int64), t.num_embeddings)
        return to_hash_ranges(features, self._hash_range_rows)

    def compute(self, ctx: EmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        batches: List[Any] = [None] * len(self._lookups)
        for parts, kjt in zip(self._parts, dist_input):
            for part in parts:
                batches[part.index] = resolve(self._lookups[part.index], part, kjt)
        training = self.training and torch.is_grad_enabled()
        for lookup, (batch, _) in zip(self._lookups, batches):
            if batch:  # in training, new keys take entries first (store v2)
                lookup._resolve_entries(batch, admit=training)
        if training:
            anchor = torch.zeros((), requires_grad=True)  # makes autograd call our backward
            flat = list(_ShardedFusedLookup.apply(self, batches, anchor))
        else:
            flat = [_pooled(lookup, b, stride) for lookup, (b, stride) in zip(self._lookups, batches)]
            _release(batches)  # nothing reads an inference batch after its lookup
        outs = []
        for parts, order in zip(self._parts, self._column_order):
            if order is None:
                outs.append(flat[parts[0].index])
            else:
                outs.append(torch.cat([flat[p.index] for p in parts], dim=1)[:, order])
        return outs

    def output_dist(
        self, ctx: EmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        awaitables = [
            odist(embs, sctx)
            for odist, sctx, embs in zip(self._output_dists, ctx.sharding_contexts, output)
        ]
        awaitable = EmbeddingBagCollectionAwaitable(
            awaitables=awaitables,
            embedding_dims=self._embedding_dims,
            embedding_names=self._embedding_names,
        )
        if self._split_mean_features:
            awaitable.callbacks.append(
                partial(divide_by_bag_length, features=self._split_mean_features, lengths=ctx.divisor)
            )
        return awaitable

    def compute_and_output_dist(
        self, ctx: EmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def _flush_fallbacks(self) -> None:
        """Step every hashed fallback. A fallback bucket cut by a row shard boundary lives on
        both shards: its gradient is summed over every rank that touched it (one all-gather of
        each split fallback's edge buckets), so the copies stay equal and a checkpoint can
        reshard the fallback bucket by bucket. Every rank calls this with the same split tables
        (the plan's row-wise tables with a fallback)."""
        # From the layouts, not the fallbacks: a rank whose hash range is empty (E < world
        # size) holds no fallback rows but must still take part.
        split = [(i, name) for i, lookup in enumerate(self._lookups)
                 for name, lo in sorted(lookup.store.layouts.items())
                 if lo.fallback_width and lo.row_block is not None]
        every_edge: List[Dict[str, torch.Tensor]] = [{} for _ in self._lookups]
        if split:
            parts = [_edge_contribution(self._lookups[i].store, name) for i, name in split]
            every = self._coordinator.gather_tensor(torch.cat([p.flatten() for p in parts]))
            start = 0
            for (i, name), part in zip(split, parts):
                every_edge[i][name] = every[:, start : start + part.numel()].reshape(-1, *part.shape)
                start += part.numel()
        for lookup, edges in zip(self._lookups, every_edge):
            lookup._flush_fallbacks(edges)

    def _end_step(self) -> None:
        """After every lookup's update: advance all lookups together, and cycle when due."""
        for lookup in self._lookups:
            lookup.steps_done += 1
        cfg = self._config
        if cycle_due(self.steps_done, cfg.schedule, cfg.prune_interval, cfg.warmup_steps):
            self.prune()

    def prune(self) -> Dict[str, Dict[str, Any]]:
        """Run one coordinated pruning cycle now (every rank must call it)."""
        return run_cycle(list(self._lookups), self._coordinator)

    @property
    def steps_done(self) -> int:
        return int(self._lookups[0].steps_done)

    @property
    def last_cycle(self) -> Dict[str, Dict[str, Any]]:
        """What the last coordinated cycle decided per logical pool (the same on every rank)."""
        return self._lookups[0].last_cycle

    @property
    def fused_optimizer(self) -> ShardedFiitedOptimizer:
        return self._fused_optimizer

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # Every tensor here is rank-local: DDP must neither broadcast nor all-reduce any of them.
        for name, _ in self.named_buffers(prefix):
            yield name

    def stats(self) -> Dict[str, Any]:
        """This rank's ``FiitedEmbeddingBagCollection.stats()`` per sharding type."""
        return {
            (st if len(parts) == 1 else f"{st}/{j}"): self._lookups[p.index].stats()
            for st, parts in zip(self._sharding_types, self._parts)
            for j, p in enumerate(parts)
        }

    @property
    def unsharded_module_type(self):
        return FiitedEmbeddingBagCollection


def _edge_contribution(store, table: str) -> torch.Tensor:
    """``HashedFallback.edge_contribution`` of a row shard's fallback; none (no bucket, -1) for
    a shard holding no rows."""
    if table in store.fallbacks:
        return store.fallbacks[table].edge_contribution()
    return HashedFallback.no_edges(store.layouts[table].dim)


def _pooled(lookup, batch, stride: int) -> torch.Tensor:
    if not batch:
        return torch.zeros(stride, 0, device=lookup.steps_done.device)
    return lookup._pooled(batch)


class _ShardedFusedLookup(torch.autograd.Function):
    """Forward: every local lookup. Backward: every lookup's fused update, then one step end
    (and pruning cycle) for all of them, so all ranks reach the cycle's collectives together."""

    @staticmethod
    def forward(ctx, module, batches, anchor):  # type: ignore[override]
        ctx.module = module
        ctx.batches = batches
        outs = tuple(_pooled(l, b, s) for l, (b, s) in zip(module._lookups, batches))
        return outs

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if ctx.batches is None:
            raise RuntimeError(
                "[torchrec_fiited] backward ran twice through one sharded FIITED collection "
                "forward (retain_graph=True): its fused update was already applied, and the "
                "batches' buffers now serve later steps"
            )
        module, batches, ctx.batches = ctx.module, ctx.batches, None
        for lookup, (batch, _), grad in zip(module._lookups, batches, grads):
            if batch:
                lookup._apply_gradients(batch, grad.contiguous(), flush=False)
        _release(batches)  # their per-id buffers serve the next step
        module._flush_fallbacks()
        module._end_step()
        return None, None, None


def _release(batches) -> None:
    for batch, _ in batches:
        if batch:
            batch.release()
