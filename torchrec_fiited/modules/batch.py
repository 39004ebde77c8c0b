"""A KJT batch resolved for the store, table-batched: each pool's features back to back.

The hot path runs per pool, not per feature (issue 12): one concatenated key tensor, one offsets
tensor of F * B + 1 bag boundaries and one set of masks per pool, so a collection of 26 features
in one pool costs one probe, one forward op (``lookup_forward_batched``) and one bag-index pass,
and host syncs per batch rather than per feature. A pool's features are ordered by table, so the
ids of any run of whole tables (a fused backward group) are one contiguous slice.

Layouts (per pool, F features, batch size B, n ids):

    keys         int64 [n]        ``store.layout.entry_key`` of every id, feature after feature
    lengths      int64 [F * B]    bag f * B + b is row b of feature f
    offsets      int64 [F * B + 1]
    weights      fp32  [n] or None
    id_starts    host ints [F + 1], feature f's ids are keys[id_starts[f]:id_starts[f + 1]]
"""

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.modules.step_buffers import Lease, StepBuffers, per_id
from torchrec_fiited.modules.validation import check_ids
from torchrec_fiited.modules.vbe import written_out
from torchrec_fiited.ops import dispatch
from torchrec_fiited.store.layout import ROW_BITS


@dataclass
class PoolFeatures:
    """The features of one pool, in the order their ids are concatenated (grouped by table).

    Args:
        pool: the pool's name.
        features: feature names.
        tables: each feature's table.
        num_entries: each feature's table's id space (host ints).
        feature_cols: int64 [F], first column of each feature's block in the [B, sum D] output.
        feature_mean: bool [F], MEAN pooling.
        key_base: int64 [F], ``table_index << ROW_BITS`` of each feature's table.
        row_offset: int64 [F], global row of local row 0 of each feature's table (row shards).
        num_entries_t: int64 [F], ``num_entries`` as a tensor.
    """

    pool: str
    features: List[str]
    tables: List[str]
    num_entries: List[int]
    feature_cols: torch.Tensor
    feature_mean: torch.Tensor
    key_base: torch.Tensor
    row_offset: torch.Tensor
    num_entries_t: torch.Tensor
    any_mean: bool = False
    columns: List[int] = field(default_factory=list)  # feature_cols as host ints

    def table_runs(self) -> List[Tuple[str, int, int]]:
        """(table, first feature, end feature) of each run of one table's features."""
        runs: List[Tuple[str, int, int]] = []
        for f, t in enumerate(self.tables):
            if runs and runs[-1][0] == t:
                runs[-1] = (t, runs[-1][1], f + 1)
            else:
                runs.append((t, f, f + 1))
        return runs


def pool_features(
    features: Sequence[Tuple[str, EmbeddingBagConfig]],
    column_of: Dict[str, int],
    layouts,
    device: torch.device,
) -> List[PoolFeatures]:
    """Each pool's ``PoolFeatures`` for a collection's (feature, table) pairs; ``layouts`` maps a
    table name to its ``store.vhpi.TableLayout``."""
    by_pool: Dict[str, Dict[str, List[Tuple[str, EmbeddingBagConfig]]]] = {}
    for feature, table in features:
        pool = layouts[table.name].pool
        by_pool.setdefault(pool, {}).setdefault(table.name, []).append((feature, table))
    out = []
    for pool, by_table in by_pool.items():
        pairs = [pair for table_pairs in by_table.values() for pair in table_pairs]
        lay = [layouts[t.name] for _, t in pairs]
        means = [t.pooling == PoolingType.MEAN for _, t in pairs]
        offsets = [lo.row_offset for lo in lay]

        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        out.append(PoolFeatures(
            pool=pool,
            features=[f for f, _ in pairs],
            tables=[t.name for _, t in pairs],
            num_entries=[t.num_embeddings for _, t in pairs],
            feature_cols=tensor([column_of[f] for f, _ in pairs]),
            feature_mean=tensor(means, torch.bool),
            key_base=tensor([lo.table_index << ROW_BITS for lo in lay]),
            row_offset=tensor(offsets),
            num_entries_t=tensor([t.num_embeddings for _, t in pairs]),
            any_mean=any(means),
            columns=[column_of[f] for f, _ in pairs],
        ))
    return out


@dataclass
class PoolBatch:
    """One pool's part of a batch (module docstring for the layouts).

    ``entries`` (int64 [n], the null entry where not resident) is set by the collection's
    ``_resolve_entries``; in a training forward also ``update_entries`` (int64 [n], what the
    fused backward takes for each id: its entry, E + g for a miss scored as group g of
    ``misses.keys``, E the entry table's rows, or -1 for a miss not scored) and ``misses``.
    """

    spec: PoolFeatures
    batch_size: int
    keys: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    weights: Optional[torch.Tensor]
    id_starts: List[int]
    entries: Optional[torch.Tensor] = None
    update_entries: Optional[torch.Tensor] = None
    misses: Optional[object] = None
    _bag_of_id: Optional[torch.Tensor] = field(default=None, repr=False)
    _id_scale: Optional[torch.Tensor] = field(default=None, repr=False)
    # Where the per-id int64 tensors come from (the batch's lease on ``step_buffers``, shared
    # by its pools); None: fresh tensors.
    lease: Optional[Lease] = field(default=None, repr=False)

    @property
    def pool(self) -> str:
        return self.spec.pool

    def per_id(self) -> torch.Tensor:
        """An int64 [n] tensor, one value per id (contents unspecified): a reused buffer under a
        lease, else fresh."""
        return per_id(self.keys.numel(), self.keys.device, self.lease)

    def ids(self, first: int, end: int) -> slice:
        """The id range of features [first, end)."""
        return slice(self.id_starts[first], self.id_starts[end])

    def feature_offsets(self, f: int) -> torch.Tensor:
        """Feature f's own offsets int64 [B + 1], starting at 0."""
        B = self.batch_size
        return self.offsets[f * B : (f + 1) * B + 1] - self.id_starts[f]

    def bag_of_id(self) -> torch.Tensor:
        """Bag int64 [n] in [0, F * B) of every id (computed once per batch)."""
        if self._bag_of_id is None:
            bags = torch.arange(self.lengths.numel(), device=self.lengths.device)
            self._bag_of_id = dispatch.expand_bags(bags, self.offsets, self.keys.numel(),
                                                   out=self.per_id())
        return self._bag_of_id

    def grad_row_of_id(self, width: int, dim: int) -> torch.Tensor:
        """Row int64 [n] of every id's output gradient in ``grad.view(-1, dim)`` of the
        collection's gradient [B, width]: bag row r of feature f is row r * (width / dim) +
        column_f / dim (every feature ``dim`` wide, at a column that is a multiple of it), so
        the fused backward reads the gradient in place instead of a stacked copy."""
        B = self.batch_size
        cols = self.spec.feature_cols // dim
        row_of_bag = (torch.arange(B, device=cols.device) * (width // dim)).unsqueeze(0) + cols.unsqueeze(1)
        return dispatch.expand_bags(row_of_bag.reshape(-1), self.offsets, self.keys.numel(),
                                    out=self.per_id())

    def id_scale(self) -> Optional[torch.Tensor]:
        """Gradient scale fp32 [n] of every id (its weight, times 1 / length in a MEAN feature),
        or None when every scale is 1."""
        if self._id_scale is None and (self.spec.any_mean or self.weights is not None):
            scale = None
            if self.spec.any_mean:
                mean_bag = self.spec.feature_mean.repeat_interleave(self.batch_size)
                inv = 1.0 / self.lengths.clamp(min=1).to(torch.float32)
                scale = torch.where(mean_bag, inv, torch.ones_like(inv))[self.bag_of_id()]
            if self.weights is not None:
                scale = self.weights if scale is None else scale * self.weights
            self._id_scale = scale
        return self._id_scale


@dataclass
class Batch:
    """A KJT resolved for one collection: batch size B and one ``PoolBatch`` per pool."""

    batch_size: int
    pools: List[PoolBatch]
    lease: Optional[Lease] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pools)

    def release(self) -> None:
        """Hand the batch's buffers back for the next step; call once nothing reads the batch
        any more (the end of its backward; an inference forward's lookup): its per-id tensors
        are then overwritten by the next step's."""
        if self.lease is not None:
            self.lease.release()


def _segments(features: KeyedJaggedTensor, names: List[str]):
    """(ids, lengths [B], weights) of each feature of ``names``, by name; a VBE batch's bags are
    written out first (``vbe.written_out``)."""
    if features.variable_stride_per_key():
        features = written_out(features, names)
    position = {k: i for i, k in enumerate(features.keys())}
    starts = features.offset_per_key()
    stride = features.stride()
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    out = {}
    for name in names:
        i = position[name]
        ids = slice(starts[i], starts[i + 1])
        out[name] = (
            values[ids], lengths[i * stride : (i + 1) * stride],
            None if weights is None else weights[ids],
        )
    return out


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` of 1-D tensors, or a view when they already lie back to back in one
    storage (a KJT's features in key order: 7 ms of copies per step at 26 features, L=20)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    ptr, end = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if (p.dtype != first.dtype or p.stride(0) != 1 or p.storage_offset() != end
                or p.untyped_storage().data_ptr() != ptr):
            return torch.cat(parts)
        end += p.numel()
    return first.as_strided((end - first.storage_offset(),), (1,), first.storage_offset())


def resolve_pool(
    spec: PoolFeatures, segments, batch_size: int, hash_ids: bool, weighted: bool,
    lease: Optional[Lease] = None,
) -> PoolBatch:
    """``PoolBatch`` of one pool from its features' (ids, lengths, weights); its per-id tensors
    from ``lease`` when given.

    Raises:
        ValueError: without ``hash_ids``, an id outside its table (naming feature and table).
    """
    counts = [int(ids.numel()) for ids, _, _ in segments]
    id_starts = [0]
    for c in counts:
        id_starts.append(id_starts[-1] + c)
    ids = _cat([s[0] for s in segments])
    keys, first_bad = dispatch.feature_keys(ids, id_starts, spec.key_base, spec.row_offset,
                                            spec.num_entries_t, hash_ids,
                                            out=per_id(ids.numel(), ids.device, lease))
    if first_bad >= 0:
        f = bisect_right(id_starts, first_bad) - 1
        check_ids(spec.features[f], spec.tables[f],
                  ids[id_starts[f] : id_starts[f + 1]].to(torch.int64), spec.num_entries[f])
    device = ids.device
    lengths = _cat([s[1] for s in segments]).to(torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    weights = _cat([s[2] for s in segments]).to(torch.float32) if weighted else None
    return PoolBatch(spec, batch_size, keys, lengths, offsets, weights, id_starts, lease=lease)


def resolve_batch(
    features: KeyedJaggedTensor,
    pools: List[PoolFeatures],
    batch_size: int,
    hash_ids: bool,
    weighted: bool,
    buffers: Optional[StepBuffers] = None,
) -> Batch:
    """Every pool's ``PoolBatch`` of a checked KJT (``validation.check_kjt``); keys of other
    modules are ignored. Nothing is changed before every id is checked. With ``buffers``, the
    per-id tensors are taken from it, for ``Batch.release`` to return."""
    segments = _segments(features, [f for spec in pools for f in spec.features])
    lease = None if buffers is None else buffers.lease()
    return Batch(batch_size, [
        resolve_pool(spec, [segments[f] for f in spec.features], batch_size, hash_ids, weighted,
                     lease)
        for spec in pools
    ], lease)
