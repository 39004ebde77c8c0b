"""state_dict / load_state_dict of a sharded FIITED collection in the logical form.

Keys, per global table ``t`` (shapes of the whole table; each rank holds its shards):

    embedding_bags.<t>.weight            fp32  [E, D]   pruned chunks read as zeros
    embedding_bags.<t>.fiited_live       uint8 [E, K]
    embedding_bags.<t>.fiited_utilities  fp32  [E, K]
    embedding_bags.<t>.fiited_last_step  int32 [E, K]
    embedding_bags.<t>.fiited_momentum   fp32  [E, K] or [E, D] (not with sgd)
    steps_done                           int64 []       replicated

They are ShardedTensors whose shards follow the plan, so ``torch.distributed.checkpoint``
saves them from one plan and loads them into another (other world size or sharding types).
The weight key is the one a dense EBC uses: a dense table loads as "every chunk live".
"""

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.nn.modules.module import _IncompatibleKeys

from torchrec_fiited.store.logical import (
    export_table,
    field_shapes,
    import_errors,
    import_tables,
    per_chunk,
    state_key,
)

_DTYPES = {"live": torch.uint8, "last_step": torch.int32}


class LogicalStateMixin:
    """Mixed into ``ShardedFiitedEmbeddingBagCollection``; uses its ``_lookups``, ``_tables``,
    ``_config``, ``_parameter_sharding`` and ``_env``."""

    def _field_shapes(self, t) -> Dict[str, Tuple[int, int]]:
        return field_shapes(t.num_embeddings, t.embedding_dim, self._config.num_chunks, self._config.optimizer)

    def _errors_of_all_ranks(self, errors: List[str]) -> List[str]:
        return _rank_errors(self._coordinator.group, errors)

    def _local_shards(self, table: str):
        """(lookup, local table name, layout) of each shard of ``table`` on this rank."""
        return [
            (lookup, name, layout)
            for lookup in self._lookups
            for name, layout in lookup.store.layouts.items()
            if layout.logical_name == table
        ]

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        destination = OrderedDict() if destination is None else destination
        for t in self._tables:
            local = [
                (layout, export_table(lookup.store, name))
                for lookup, name, layout in self._local_shards(t.name)
            ]
            cs = t.embedding_dim // self._config.num_chunks
            plan_shards = self._parameter_sharding[t.name].sharding_spec.shards
            for field, shape in self._field_shapes(t).items():
                scale = cs if per_chunk(field, self._config.optimizer) else 1
                metas = [_scaled(m, scale) for m in plan_shards]
                shards = [
                    Shard(tensors[field], _find(metas, layout.row_offset, layout.chunk_offset * cs // scale))
                    for layout, tensors in local
                ]
                dtype = _DTYPES.get(field, torch.float32)
                destination[prefix + state_key(t.name, field)] = _sharded(
                    shards, metas, shape, dtype, self._env.process_group
                )
        destination[prefix + "steps_done"] = torch.tensor(self.steps_done, dtype=torch.int64)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        expected = {
            state_key(t.name, f) for t in self._tables for f in self._field_shapes(t)
        } | {"steps_done"}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint does not match this sharded FIITED collection: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        per_lookup: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}
        errors: List[str] = []
        for t in self._tables:
            cs = t.embedding_dim // self._config.num_chunks
            for lookup, name, layout in self._local_shards(t.name):
                fields = per_lookup.setdefault(id(lookup), {}).setdefault(name, {})
                for field, shape in self._field_shapes(t).items():
                    value = state_dict.get(state_key(t.name, field))
                    if value is None:
                        continue
                    scale = cs if per_chunk(field, self._config.optimizer) else 1
                    rows = (layout.row_offset, layout.num_entries)
                    cols = (layout.chunk_offset * cs // scale, layout.dim // scale)
                    piece = _piece(value, rows, cols)
                    if piece is None:
                        errors.append(
                            f"table {t.name!r}: {field} has no shard covering rows {rows} cols {cols}"
                        )
                    else:
                        fields[field] = piece
        for lookup in self._lookups:
            errors += import_errors(lookup.store, per_lookup.get(id(lookup), {}))
        # All ranks load or none does: a rank whose shard does not fit fails every rank.
        errors = self._errors_of_all_ranks(errors)
        if errors:
            raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
        steps = state_dict.get("steps_done")
        for lookup in self._lookups:
            import_tables(lookup.store, per_lookup.get(id(lookup), {}))
            if steps is not None:
                lookup.steps_done.fill_(int(steps))
        return _IncompatibleKeys(missing, unexpected)


def _rank_errors(group, errors: List[str]) -> List[str]:
    if not dist.is_initialized():
        return errors
    every: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, errors, group=group)
    return [f"rank {r}: {e}" for r, errs in enumerate(every) for e in errs]


def _scaled(m: ShardMetadata, scale: int) -> ShardMetadata:
    r, c = m.shard_offsets
    nr, nc = m.shard_sizes
    return ShardMetadata([r, c // scale], [nr, nc // scale], m.placement)


def _find(metas: List[ShardMetadata], row: int, col: int) -> ShardMetadata:
    for m in metas:
        if list(m.shard_offsets) == [row, col]:
            return m
    raise RuntimeError(f"[torchrec_fiited] no planned shard at ({row}, {col})")


def _sharded(shards, metas, shape, dtype, pg) -> ShardedTensor:
    props = TensorProperties(
        dtype=dtype, layout=torch.strided, requires_grad=False,
        memory_format=torch.contiguous_format, pin_memory=False,
    )
    md = ShardedTensorMetadata(list(metas), torch.Size(shape), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md, process_group=pg)


def _piece(value: Any, rows: Tuple[int, int], cols: Tuple[int, int]) -> Optional[torch.Tensor]:
    """Rows [r0, r0 + nr) and cols [c0, c0 + nc) of a ShardedTensor (from its local shards) or
    a plain tensor; None if this rank holds no shard covering them."""
    (r0, nr), (c0, nc) = rows, cols
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            (sr, sc), (snr, snc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if sr <= r0 and r0 + nr <= sr + snr and sc <= c0 and c0 + nc <= sc + snc:
                return shard.tensor[r0 - sr : r0 - sr + nr, c0 - sc : c0 - sc + nc]
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        return value[r0 : r0 + nr, c0 : c0 + nc]
    return None
