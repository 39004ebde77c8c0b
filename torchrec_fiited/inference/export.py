"""Export a trained FIITED model for serving, and save/load it without the training state.

Serving needs, per pool, only the keys that have something to serve, where their live chunks
are, and the live chunks themselves (store v2, issue 11: nothing is sized by ``num_embeddings``):

    keys          int64 [S']      a compact ``ResidentHashTable``-layout probe (buckets of W slots,
                                  ``EMPTY_KEY`` where free) over the pool's served keys,
                                  ``entry_key(table_index, row)`` as in training, rebuilt at a
                                  load factor <= 1/2 (``PROBE_LOAD``); looked up with the hash
                                  table's op (``fiited::hash_lookup``, native when built)
    chunk_slots   int32 [S'+1, K] compacted slot of chunk k of the key in probe slot s, or -1;
                                  row S' is the null row every absent key reads (zeros)
    weights       [n_live, cs]    the live chunks, compacted, stored as ``inference.quantize``
                                  says (fp32, fp16, or int8 with a per-chunk scale and bias)

A served key is a resident key with at least one live chunk; with ``miss="hashed"`` every
resident key of the table is served (a resident key with no live chunk reads zeros, an absent
one reads the table's hashed fallback, as in training). Per table with a fallback,
``fallbacks[t].weights`` holds its H rows of D (same dtype as the pools), read by
``HashedFallback.rows_of``. Utilities and their base step, scores, the sketch, the free stack and the
optimizer state are training-only and are dropped.

Without ``hash_ids`` an id outside [0, E) is refused in every form: eagerly (and in an FX trace)
with the training module's ValueError, in TorchScript and torch.export programs by a check they
run (a key built from such an id would otherwise just miss the probe and read zeros).

File format (``save_inference``): ``torch.save`` of a dict holding only plain Python values and
tensors, so ``load_inference`` reads it with ``torch.load(weights_only=True)`` (no pickled code):

    format       "torchrec_fiited.inference"
    version      3 (2 hashed fallback rows by mix64(key); 1 was store v1's per-row
                 ``chunk_slots`` [E, K]; both refused, re-export)
    structure    JSON: how to rebuild the module ({"kind": "FiitedInferenceEBC", "spec": ...} or
                 {"kind": "DLRM", constructor args, "embedding_bag_collection": ...})
    state_dict   the module's tensors
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_fiited.inference.quantize import (
    check_dtype,
    pooled_rows,
    quantize_rows,
    quantized_lookup,
    storage_layout,
)
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.modules.validation import check_ids, check_kjt, is_tracing
from torchrec_fiited.modules.vbe import written_out
from torchrec_fiited.ops import dispatch, lookup_forward
from torchrec_fiited.ops.hash_reference import EMPTY_KEY, bucket_of
from torchrec_fiited.store import PRUNED, VHPIStore, hash_ids
from torchrec_fiited.store.hash_table import DEFAULT_BUCKET_SIZE, ResidentHashTable
from torchrec_fiited.store.layout import MAX_TABLES, ROW_BITS, key_table

FORMAT = "torchrec_fiited.inference"
VERSION = 3
_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
PathLike = Union[str, "os.PathLike[str]"]
# Served keys per probe slot at export: a bucket of 32 then overflows with probability ~1e-4
# (Poisson(16) > 32); an overflowing build is retried with more buckets.
PROBE_LOAD = 0.5
MIN_BUCKET = 8
# Written out as a literal in _entry_keys and _fallback_rows (TorchScript cannot read int
# globals); checked here against the store's.
_ROW_MASK_LITERAL = 72057594037927935  # (1 << 56) - 1
assert _ROW_MASK_LITERAL == (1 << ROW_BITS) - 1 and ROW_BITS == 56


# ---- structure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceTable:
    """One served table.

    Args:
        name: table name.
        num_embeddings: E (the id range; sizes no tensor).
        embedding_dim: D = K * chunk_size of its pool.
        feature_names: features looked up in it, in output order.
        pooling: "SUM" or "MEAN" (a ``PoolingType`` name; anything but MEAN sums, as in training).
        pool: name of the compacted pool holding its keys and live chunks.
        table_index: the top bits of its keys (``store.layout.entry_key``), unique in its pool.
        kept_columns: FIITED-2D tables only: the columns in [0, D / K) chunk k stores, K tuples of
            the pool's chunk_size each, ascending; the other columns read zeros. None: all.
        fallback_rows: H, rows of its hashed fallback (``miss="hashed"``); 0: absent ids read
            zeros.
        fallback_width: permuted rows per fallback bucket (``store.fallback``); an absent id
            reads row ``row_permutation(id, E) // fallback_width``. H is ceil(E / width).
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Tuple[str, ...]
    pooling: str
    pool: str
    table_index: int
    kept_columns: Optional[Tuple[Tuple[int, ...], ...]] = None
    fallback_rows: int = 0
    fallback_width: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if self.kept_columns is not None:
            object.__setattr__(self, "kept_columns", tuple(tuple(int(c) for c in k) for k in self.kept_columns))
        if self.pooling not in PoolingType.__members__:
            raise ValueError(
                f"table {self.name!r}: pooling must be one of {list(PoolingType.__members__)}, "
                f"got {self.pooling!r}"
            )
        if not (isinstance(self.table_index, int) and 0 <= self.table_index < MAX_TABLES):
            raise ValueError(
                f"table {self.name!r}: table_index must be an int in [0, {MAX_TABLES}), "
                f"got {self.table_index!r}"
            )
        if not (isinstance(self.fallback_rows, int) and self.fallback_rows >= 0):
            raise ValueError(
                f"table {self.name!r}: fallback_rows must be an int >= 0, got {self.fallback_rows!r}"
            )
        if self.fallback_rows and not (
            isinstance(self.fallback_width, int) and self.fallback_width > 0
            and self.fallback_rows == -(-self.num_embeddings // self.fallback_width)
        ):
            raise ValueError(
                f"table {self.name!r}: {self.fallback_rows} fallback rows need a fallback_width "
                f"w > 0 with ceil({self.num_embeddings} / w) rows, got {self.fallback_width!r}"
            )


@dataclass(frozen=True)
class InferencePool:
    """One compacted pool: a probe of ``num_buckets`` x ``bucket_size`` key slots and ``rows``
    live chunks of ``chunk_size`` floats."""

    name: str
    rows: int
    chunk_size: int
    num_buckets: int
    bucket_size: int

    def __post_init__(self) -> None:
        W = self.bucket_size
        if not (isinstance(W, int) and MIN_BUCKET <= W <= 128 and W & (W - 1) == 0):
            raise ValueError(f"pool {self.name!r}: bucket_size must be a power of two in "
                             f"[{MIN_BUCKET}, 128], got {W!r}")
        if not (isinstance(self.num_buckets, int) and 1 <= self.num_buckets <= 1 << 31):
            raise ValueError(f"pool {self.name!r}: num_buckets must be in [1, 2^31], got "
                             f"{self.num_buckets!r}")
        if not (isinstance(self.rows, int) and self.rows >= 0):
            raise ValueError(f"pool {self.name!r}: rows must be an int >= 0, got {self.rows!r}")

    @property
    def slots(self) -> int:
        """S', key slots of the probe."""
        return self.num_buckets * self.bucket_size


@dataclass(frozen=True)
class InferenceSpec:
    """Everything but the tensors of a ``FiitedInferenceEBC`` (what its file stores as JSON).

    Args:
        tables: the tables, in output order.
        pools: the compacted pools.
        num_chunks: K.
        dtype: pool (and fallback) storage, "fp32", "fp16" or "int8" (``inference.quantize``).
        hash_ids: ids are hashed into [0, E) (else they must lie in it).
        is_weighted: bags are pooled with the KJT's per-sample weights.
    """

    tables: Tuple[InferenceTable, ...]
    pools: Tuple[InferencePool, ...]
    num_chunks: int
    dtype: str
    hash_ids: bool
    is_weighted: bool

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        chunk_size = {p.name: p.chunk_size for p in self.pools}
        indices: Dict[Tuple[str, int], str] = {}
        for t in self.tables:
            if t.pool not in chunk_size:
                raise ValueError(
                    f"table {t.name!r}: pool {t.pool!r} is not one of {sorted(chunk_size)}"
                )
            other = indices.setdefault((t.pool, t.table_index), t.name)
            if other != t.name:
                raise ValueError(f"tables {other!r} and {t.name!r} share pool {t.pool!r} and "
                                 f"table_index {t.table_index}")
            if t.kept_columns is not None:
                _check_kept_columns(t, self.num_chunks, chunk_size[t.pool])
            elif t.embedding_dim != self.num_chunks * chunk_size[t.pool]:
                raise ValueError(
                    f"table {t.name!r}: embedding_dim {t.embedding_dim} vs num_chunks {self.num_chunks}"
                    f" x chunk_size {chunk_size[t.pool]} of pool {t.pool!r}"
                )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def stored_columns(self, table: InferenceTable) -> Optional[torch.Tensor]:
        """Row column in [0, D) of each stored column of ``table``, int64 [D_active]; None: all."""
        if table.kept_columns is None:
            return None
        cs = table.embedding_dim // self.num_chunks
        return torch.tensor(
            [k * cs + c for k, cols in enumerate(table.kept_columns) for c in cols], dtype=torch.int64
        )

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "InferenceSpec":
        """Inverse of ``to_dict``; raises ValueError naming a missing or extra field."""
        try:
            return cls(
                tables=tuple(InferenceTable(**t) for t in d["tables"]),
                pools=tuple(InferencePool(**p) for p in d["pools"]),
                **{k: v for k, v in d.items() if k not in ("tables", "pools")},
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed inference spec: {type(err).__name__}: {err}") from err

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                feature_names=list(t.feature_names), pooling=PoolingType[t.pooling],
                data_type=_DATA_TYPES[self.dtype],
            )
            for t in self.tables
        ]


def _check_kept_columns(t: InferenceTable, num_chunks: int, width: int) -> None:
    cs, rest = divmod(t.embedding_dim, num_chunks)
    ok = rest == 0 and len(t.kept_columns) == num_chunks and all(
        len(cols) == width and list(cols) == sorted(set(cols)) and all(0 <= c < cs for c in cols)
        for cols in t.kept_columns
    )
    if not ok:
        raise ValueError(
            f"table {t.name!r}: kept_columns must be {num_chunks} ascending tuples of {width} columns "
            f"in [0, {t.embedding_dim} / {num_chunks}), got {t.kept_columns}"
        )


# ---- the serving module -----------------------------------------------------------------------


class _StoredPool(nn.Module):
    """One compacted pool: probe ``keys`` int64 [S'], ``chunk_slots`` int32 [S' + 1, K] (row S'
    the null row) and the live chunks ``weights`` (``inference.quantize.storage_layout``)."""

    def __init__(self, pool: InferencePool, num_chunks: int, dtype: str, device: torch.device) -> None:
        super().__init__()
        S = pool.slots
        self.register_buffer("keys", torch.full((S,), EMPTY_KEY, dtype=torch.int64, device=device))
        self.register_buffer(
            "chunk_slots", torch.full((S + 1, num_chunks), PRUNED, dtype=torch.int32, device=device)
        )
        shape, torch_dtype = storage_layout(pool.rows, pool.chunk_size, dtype)
        self.register_buffer("weights", torch.zeros(shape, dtype=torch_dtype, device=device))


class _StoredFallback(nn.Module):
    """``weights`` of one table's hashed fallback: H rows of D, stored like the pools."""

    def __init__(self, table: InferenceTable, dtype: str, device: torch.device) -> None:
        super().__init__()
        shape, torch_dtype = storage_layout(table.fallback_rows, table.embedding_dim, dtype)
        self.register_buffer("weights", torch.zeros(shape, dtype=torch_dtype, device=device))


class FiitedInferenceEBC(EmbeddingBagCollectionInterface):
    """Read-only, compacted FIITED embeddings for serving (build it with ``export_for_inference``).

    Same contract as the training ``FiitedEmbeddingBagCollection`` in eval mode: for F features
    with dims D_f, a KJT with batch size B gives a ``KeyedTensor`` with the same keys, order and
    ``length_per_key``, values fp32 [B, sum_f D_f]; pruned chunks and ids without an entry read
    zeros (or, with ``miss="hashed"``, the table's hashed fallback). With dtype "fp32" the values
    are bitwise those of the training module; "fp16" and "int8" stay within the bounds documented
    in ``inference.quantize``. Ids are checked (or hashed) exactly as in training.

    Holds per pool ``pools[p].keys`` int64 [S'] (a hash probe over the keys it serves),
    ``pools[p].chunk_slots`` int32 [S' + 1, K] and ``pools[p].weights`` ([n_live, chunk_size]
    fp32/fp16, or uint8 [n_live, chunk_size + 8] for int8), and per table with a hashed fallback
    ``fallbacks[t].weights`` ([H, D], same dtypes); nothing sized by ``num_embeddings``
    (module docstring). A FIITED-2D pool stores only its kept columns
    (``InferenceTable.kept_columns``): its rows are [n_live, cs'], and the lookup scatters them
    into the D columns, the pruned ones reading zero.

    Args:
        spec: the structure (tables, pools, K, dtype, hashing, weighting).
        device: where the tensors live (default CPU); "meta" to load a state_dict with assign.

    Example::

        ebc = FiitedEmbeddingBagCollection(tables, FiitedConfig(num_chunks=2, budget=0.5))
        ...  # train, with tables t1 (D=8, feature f1) and t2 (D=4, feature f2)
        served = export_for_inference(ebc, dtype="int8")
        #        0       1        2   <- batch
        # f1   [0,1]  None    [2]
        # f2   [3]    [4]     [5,6]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f1", "f2"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6]),
            lengths=torch.tensor([2, 0, 1, 1, 1, 2]))
        out = served(kjt)
        out.values().shape   # torch.Size([3, 12]); out.keys() == ["f1", "f2"]
        served.pools["shared_cs4"].weights.shape   # (live chunks, 4 + 8), torch.uint8
        served.nbytes_by_component()   # {"keys": ..., "chunk_slots": ..., "chunks": ..., ...}
    """

    # Python-only accessors TorchScript must not compile (an InferenceSpec has no TorchScript type).
    __jit_unused_properties__ = ["spec", "dtype"]
    # Types of what forward reads, for TorchScript (it cannot infer an empty dict's).
    _stored_columns: Dict[str, torch.Tensor]

    def __init__(self, spec: InferenceSpec, device: Optional[torch.device] = None) -> None:
        super().__init__()
        device = torch.device(device or "cpu")
        self._spec = spec
        self._configs = spec.embedding_bag_configs()
        self.pools = nn.ModuleDict(
            {p.name: _StoredPool(p, spec.num_chunks, spec.dtype, device) for p in spec.pools}
        )
        self.fallbacks = nn.ModuleDict(
            {t.name: _StoredFallback(t, spec.dtype, device) for t in spec.tables if t.fallback_rows > 0}
        )
        bucket_size = {p.name: p.bucket_size for p in spec.pools}
        # forward reads only these plain lists (one entry per feature, in output order), so the
        # module scripts, exports and FX-traces; the spec stays the Python-side description.
        features = [(f, t) for t in spec.tables for f in t.feature_names]
        self._feature_names: List[str] = [f for f, _ in features]
        self._feature_tables: List[str] = [t.name for _, t in features]
        self._feature_pools: List[str] = [t.pool for _, t in features]
        self._feature_rows: List[int] = [t.num_embeddings for _, t in features]
        self._feature_dims: List[int] = [t.embedding_dim for _, t in features]
        self._feature_fallback_width: List[int] = [t.fallback_width for _, t in features]
        self._feature_mean: List[bool] = [t.pooling == "MEAN" for _, t in features]
        self._feature_table_index: List[int] = [t.table_index for _, t in features]
        self._feature_buckets: List[int] = [bucket_size[t.pool] for _, t in features]
        self._hash_ids: bool = spec.hash_ids
        self._weighted: bool = spec.is_weighted
        self._dtype: str = spec.dtype
        # FIITED-2D tables: where their stored columns go in the D columns of a row.
        # Plain CPU attributes (not buffers: they are the spec's, not state); moved on use.
        self._stored_columns = {
            t.name: cols for t in spec.tables if (cols := spec.stored_columns(t)) is not None
        }

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not torch.jit.is_scripting():
            # Eager (and in an FX graph, where it is a leaf): the training module's checks, keys
            # of other modules dropped, a VBE batch expanded. Graph capture keeps the shape checks.
            features = _checked(features, self._feature_names, self._weighted)
        probes: Dict[str, torch.Tensor] = {}
        slots: Dict[str, torch.Tensor] = {}
        stored: Dict[str, torch.Tensor] = {}
        for name, pool in self.pools.items():
            probes[name] = pool.keys
            slots[name] = pool.chunk_slots
            stored[name] = pool.weights
        fallback: Dict[str, torch.Tensor] = {}
        for name, fb_module in self.fallbacks.items():
            fallback[name] = fb_module.weights
        per_feature = features.to_dict()
        pooled: List[torch.Tensor] = []
        for i in range(len(self._feature_names)):
            jt = per_feature[self._feature_names[i]]
            table = self._feature_tables[i]
            pool_name = self._feature_pools[i]
            rows = _rows(jt.values(), self._feature_names[i], table, self._feature_rows[i], self._hash_ids)
            keys = _entry_keys(self._feature_table_index[i], rows)
            found = _probe(probes[pool_name], self._feature_buckets[i], keys)
            weights: Optional[torch.Tensor] = None
            if self._weighted:
                weights = jt.weights().to(torch.float32)
            cols: Optional[torch.Tensor] = None
            if table in self._stored_columns:
                cols = self._stored_columns[table]
            fb: Optional[torch.Tensor] = None
            if table in fallback:
                fb = fallback[table]
            pooled.append(_pool(
                stored[pool_name], self._dtype, slots[pool_name], found, jt.offsets().to(torch.int64), weights,
                self._feature_mean[i], self._feature_dims[i], cols, fb, keys,
                self._feature_rows[i], self._feature_fallback_width[i],
            ))
        return KeyedTensor(
            keys=self._feature_names, length_per_key=self._feature_dims, values=torch.cat(pooled, dim=1)
        )

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._spec.is_weighted

    @property
    def spec(self) -> InferenceSpec:
        return self._spec

    @property
    def dtype(self) -> str:
        return self._spec.dtype

    def nbytes_by_component(self) -> Dict[str, int]:
        """Bytes of every tensor the module holds, by component: ``keys`` (the probes),
        ``chunk_slots``, ``chunks`` (the pools' live chunks), ``fallback`` and ``columns`` (the
        FIITED-2D column maps); ``total`` is their sum. Each storage is counted once."""
        parts = {"keys": 0, "chunk_slots": 0, "chunks": 0, "fallback": 0, "columns": 0}
        seen = set()

        def add(part: str, t: torch.Tensor) -> None:
            s = t.untyped_storage()
            key = (s.data_ptr(), str(t.device)) if s.data_ptr() else id(t)  # meta/empty: by tensor
            if key not in seen:
                seen.add(key)
                parts[part] += s.nbytes()

        for name, t in self.named_buffers():
            if name.startswith("fallbacks."):
                add("fallback", t)
            elif name.endswith(".keys"):
                add("keys", t)
            elif name.endswith(".chunk_slots"):
                add("chunk_slots", t)
            else:
                add("chunks", t)
        for t in self._stored_columns.values():
            add("columns", t)
        parts["total"] = sum(parts.values())
        return parts

    def nbytes(self) -> int:
        """Bytes of every tensor the module holds (``nbytes_by_component()["total"]``)."""
        return self.nbytes_by_component()["total"]

    def served_slots(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Probe slot int64 [n] of each of ``ids`` of ``table`` (hashed or checked as in forward),
        -1 where the id has no entry. For tests, tools and benchmarks; forward does the same."""
        t = next((t for t in self._spec.tables if t.name == table), None)
        if t is None:
            raise ValueError(f"unknown table {table!r}; tables are {[t.name for t in self._spec.tables]}")
        rows = _rows(ids, t.feature_names[0], t.name, t.num_embeddings, self._hash_ids)
        W = next(p.bucket_size for p in self._spec.pools if p.name == t.pool)
        return _probe(self.pools[t.pool].keys, W, _entry_keys(t.table_index, rows))

    def check_state(self) -> None:
        """Raise ValueError if the tensors break the layout (a damaged or hand-made file): a key
        outside its bucket or held twice, chunk addresses outside the pool, a pool row held by no
        key or by two, a null row or empty probe slot holding chunks."""
        for p in self._spec.pools:
            errors = _pool_errors(p, self.pools[p.name], self._spec)
            if errors:
                raise ValueError(f"pool {p.name!r}: " + "; ".join(errors))

    @classmethod
    def from_training(
        cls, module: FiitedEmbeddingBagCollection, dtype: str = "fp32"
    ) -> "FiitedInferenceEBC":
        """Compact ``module``'s served keys and live chunks into a new serving module
        (``module`` is not changed).

        Raises:
            ValueError: an unknown dtype, fp16 overflow, or a row- or column-wise shard (gather
                it first: ``torchrec_fiited.distributed.gather_unsharded``).
        """
        check_dtype(dtype)
        store = module.store
        for name, layout in store.layouts.items():
            if layout.row_offset or layout.chunk_offset or layout.logical_name != name:
                raise ValueError(
                    f"table {name!r} is a shard of {layout.logical_name!r} (row_offset "
                    f"{layout.row_offset}, chunk_offset {layout.chunk_offset}): export the "
                    f"unsharded module (torchrec_fiited.distributed.gather_unsharded) instead"
                )
        fallback_tables = set(store.fallbacks.keys())
        pools, compacted = [], {}
        for name, pool in store.pools.items():
            c = _compact_pool(store, name, fallback_tables)
            compacted[name] = c
            pools.append(InferencePool(name, int(c["rows"].shape[0]), pool.stored_width,
                                       c["num_buckets"], c["bucket_size"]))
        tables = tuple(
            InferenceTable(
                t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names), t.pooling.name,
                store.layouts[t.name].pool, store.layouts[t.name].table_index,
                _kept_columns(store, t.name),
                store.fallbacks[t.name].rows if t.name in store.fallbacks else 0,
                store.fallbacks[t.name].grid.width if t.name in store.fallbacks else 0,
            )
            for t in module.embedding_bag_configs()
        )
        spec = InferenceSpec(tables, tuple(pools), store.num_chunks, dtype,
                             bool(module.config.hash_ids), bool(module.is_weighted()))
        out = cls(spec, device=module.steps_done.device)
        for name, c in compacted.items():
            target = out.pools[name]
            target.keys.copy_(c["keys"])
            target.chunk_slots.copy_(c["chunk_slots"])
            target.weights.copy_(quantize_rows(c["rows"], dtype, f"pool {name!r}"))
        for name, fb in out.fallbacks.items():
            fb.weights.copy_(quantize_rows(store.fallbacks[name].weights, dtype,
                                           f"hashed fallback of table {name!r}"))
        return out.eval()


@torch.fx.wrap
def _checked(features: KeyedJaggedTensor, feature_names: List[str], is_weighted: bool) -> KeyedJaggedTensor:
    """The KJT of the module's features, checked as in training: keys of other modules are
    dropped and a VBE batch is written out to its padded equivalent (``modules/vbe.py``)."""
    check_kjt(features, feature_names, is_weighted)
    if list(features.keys()) == feature_names and not features.variable_stride_per_key():
        return features
    return written_out(features, feature_names)


def _id_range_message(feature: str, table: str, num_entries: int) -> str:
    return ("feature '" + feature + "' (table '" + table + "'): an id lies outside [0, "
            + str(num_entries) + "); set hash_ids=True to hash arbitrary ids into the table")


def _assert_ids_in_range(ids: torch.Tensor, feature: str, table: str, num_entries: int) -> None:
    """The id range check of a captured graph, with a message naming the feature: a branch in
    TorchScript (a ``torch.jit.Error`` at run time; TorchScript drops ``torch._assert_async``),
    an assert the program runs in torch.export (a RuntimeError; export cannot branch on data)."""
    ok = ((ids >= 0) & (ids < num_entries)).all()
    if torch.jit.is_scripting():
        if not bool(ok):
            raise RuntimeError(_id_range_message(feature, table, num_entries))
    else:
        torch._assert_async(ok, _id_range_message(feature, table, num_entries))


@torch.fx.wrap
def _rows(ids: torch.Tensor, feature: str, table: str, num_entries: int, hashed: bool) -> torch.Tensor:
    """Rows int64 [n] of a feature's ids: hashed into [0, E), or checked to lie there (eagerly
    with the training module's ValueError; in a captured graph by an assert it runs)."""
    ids = ids.to(torch.int64)
    if hashed:
        return hash_ids(ids, num_entries)
    if torch.jit.is_scripting():
        _assert_ids_in_range(ids, feature, table, num_entries)
    elif is_tracing():
        _assert_ids_in_range(ids, feature, table, num_entries)
    else:
        check_ids(feature, table, ids, num_entries)
    return ids


def _entry_keys(table_index: int, rows: torch.Tensor) -> torch.Tensor:
    """``store.layout.entry_key``: int64 [n] keys ``table_index << 56 | row``."""
    return (rows & 72057594037927935) | (table_index << 56)  # _ROW_MASK_LITERAL, ROW_BITS


@torch.jit.unused
def _eager_hash_lookup(probe_keys: torch.Tensor, bucket_size: int, keys: torch.Tensor) -> torch.Tensor:
    return dispatch.hash_lookup(probe_keys, bucket_size, keys)


@torch.fx.wrap
def _probe(probe_keys: torch.Tensor, bucket_size: int, keys: torch.Tensor) -> torch.Tensor:
    """Probe slot int64 [n] of each key, -1 where the pool serves no such key (the hash-table op:
    native when built, else ``ops/hash_reference.lookup``)."""
    if torch.jit.is_scripting():
        return torch.ops.fiited.hash_lookup(probe_keys, bucket_size, keys)
    return _eager_hash_lookup(probe_keys, bucket_size, keys)


@torch.jit.unused
def _eager_lookup(
    stored: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    return lookup_forward(stored, chunk_slots, entries, offsets, weights, mean)


@torch.jit.unused
def _eager_row_permutation(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return dispatch.row_permutation(rows, [0, rows.numel()], [num_rows], [0], inverse=False)


def _fallback_rows(keys: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """``HashedFallback.rows_of`` of a whole table: the fallback row int64 [n] of each key."""
    rows = keys & 72057594037927935  # _ROW_MASK_LITERAL
    if torch.jit.is_scripting():
        one = torch.tensor([0, rows.numel()], dtype=torch.int64)
        permuted = torch.ops.fiited.row_permutation(
            rows, one, torch.tensor([num_rows], dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
            False,
        )
    else:
        permuted = _eager_row_permutation(rows, num_rows)
    return torch.div(permuted, width, rounding_mode="floor")


@torch.fx.wrap
def _pool(
    stored: torch.Tensor,
    dtype: str,
    chunk_slots: torch.Tensor,
    found: torch.Tensor,
    offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    mean: bool,
    dim: int,
    stored_columns: Optional[torch.Tensor],
    fallback: Optional[torch.Tensor],
    keys: torch.Tensor,
    num_rows: int,
    fallback_width: int,
) -> torch.Tensor:
    """Pooled fp32 [B, D] of one feature: probe slots ``found`` int64 [n] (-1: absent) of its
    ``keys`` int64 [n], offsets int64 [B + 1].

    An absent key reads the null row of ``chunk_slots`` (zeros). fp32 runs the training op
    itself (``torch.ops.fiited.lookup_forward``), so the output is bitwise the training
    module's; fp16/int8 dequantize (``inference.quantize``). A FIITED-2D table's stored columns
    are scattered into its D columns, the pruned ones reading zero. With a hashed ``fallback``
    [H, D], the absent keys' fallback rows are added as the training module adds them.
    """
    B = offsets.numel() - 1
    null = torch.full_like(found, chunk_slots.shape[0] - 1)
    entries = torch.where(found >= 0, found, null)
    if stored.shape[0] == 0:  # no live chunk at all: every chunk reads zero
        out = torch.zeros(B, dim, device=stored.device)
    else:
        if dtype == "fp32":
            if torch.jit.is_scripting():
                pooled = torch.ops.fiited.lookup_forward(stored, chunk_slots, entries, offsets, weights, mean)
            else:
                pooled = _eager_lookup(stored, chunk_slots, entries, offsets, weights, mean)
        else:
            pooled = quantized_lookup(stored, dtype, chunk_slots, entries, offsets, weights, mean)
        if stored_columns is None:
            out = pooled
        else:
            out = pooled.new_zeros(B, dim)  # pruned dimensions read zero
            out = out.index_copy_(1, stored_columns.to(pooled.device), pooled)
    if fallback is not None:
        w = (found < 0).to(torch.float32)
        if weights is not None:
            w = w * weights
        extra = pooled_rows(fallback, dtype, _fallback_rows(keys, num_rows, fallback_width), w, offsets)
        if mean:
            extra = extra / (offsets[1:] - offsets[:-1]).clamp(min=1).to(extra.dtype).unsqueeze(1)
        out = out + extra
    return out


def _kept_columns(store: VHPIStore, table: str) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """The table's FIITED-2D column map when its pool stores part of each chunk, else None."""
    if store.stored_columns(table) is None:
        return None
    return tuple(tuple(row) for row in store.dim_maps[table].kept.tolist())


def _probe_table(keys: torch.Tensor, device: torch.device) -> ResidentHashTable:
    """A fresh ``ResidentHashTable`` holding every one of ``keys`` (distinct int64 [n]), at load
    <= ``PROBE_LOAD``; retried with more buckets when a bucket overflows (no key is dropped)."""
    n = keys.numel()
    W = DEFAULT_BUCKET_SIZE
    while W > MIN_BUCKET and n < PROBE_LOAD * W:
        W //= 2
    num_buckets = max(1, math.ceil(n / (PROBE_LOAD * W)))
    while True:
        table = ResidentHashTable(num_buckets, W, device)
        if n == 0 or bool((table.insert(keys, torch.zeros(n, device=device)).slots >= 0).all()):
            return table
        num_buckets += max(1, num_buckets // 8)


def _compact_pool(store: VHPIStore, pool: str, fallback_tables) -> Dict[str, Any]:
    """The served form of ``pool``: its served keys in a fresh probe, and their live chunks
    renumbered 0..n_live-1.

    Served keys: resident keys with a live chunk, and every resident key of a table with a
    hashed fallback (there, absent and resident-without-chunks differ: fallback vs zeros).
    Pool rows are ordered by key (table index, then row), then chunk_id, so the K chunks of a
    key sit next to each other and the order does not depend on the training hash table.

    Returns:
        keys int64 [S'], chunk_slots int32 [S' + 1, K], rows fp32 [n_live, cs'], num_buckets, W.
    """
    et, cp = store.entries[pool], store.pools[pool]
    K = store.num_chunks
    device = cp.weights.device
    entries = et.seen()
    keys = et.keys_of(entries)
    old_slots = et.chunk_slots[entries]
    live = old_slots >= 0
    keep = live.any(1)
    with_fallback = [store.layouts[t].table_index for t in store.tables_of_pool(pool)
                     if t in fallback_tables]
    if with_fallback:
        keep |= torch.isin(key_table(keys), torch.tensor(with_fallback, device=keys.device))
    keys, old_slots, live = keys[keep], old_slots[keep], live[keep]
    order = torch.argsort(keys)
    keys, old_slots, live = keys[order], old_slots[order], live[order]
    table = _probe_table(keys, device)
    probe_slots = table.lookup(keys)
    n_live = int(live.sum())
    new = torch.full_like(old_slots, PRUNED)
    new[live] = torch.arange(n_live, dtype=new.dtype, device=device)  # row-major: key, chunk_id
    chunk_slots = torch.full((table.capacity + 1, K), PRUNED, dtype=torch.int32, device=device)
    chunk_slots[probe_slots] = new.to(torch.int32)
    rows = cp.weights[old_slots[live].to(torch.int64)]
    return {"keys": table.keys, "chunk_slots": chunk_slots, "rows": rows.detach(),
            "num_buckets": table.num_buckets, "bucket_size": table.bucket_size}


def _pool_errors(p: InferencePool, module: _StoredPool, spec: InferenceSpec) -> List[str]:
    """What is wrong with the tensors of served pool ``p`` (``FiitedInferenceEBC.check_state``)."""
    keys, cs = module.keys, module.chunk_slots.to(torch.int64)
    errors: List[str] = []
    occupied = keys != EMPTY_KEY
    k = keys[occupied]
    if torch.unique(k).numel() != k.numel():
        errors.append("a key is held twice")
    at = occupied.nonzero().squeeze(1)
    if bool((bucket_of(k, p.num_buckets) != at // p.bucket_size).any()):
        errors.append("a key sits outside its hash bucket")
    known = torch.tensor([t.table_index for t in spec.tables if t.pool == p.name], dtype=torch.int64)
    if k.numel() and not bool(torch.isin(key_table(k).cpu(), known).all()):
        errors.append("a key names a table outside the pool")
    if bool(((cs < PRUNED) | (cs >= p.rows)).any()):
        errors.append(f"chunk_slots outside [-1, {p.rows})")
        return errors
    if bool((cs[-1] != PRUNED).any()) or bool((cs[:-1][~occupied] != PRUNED).any()):
        errors.append("the null row or an empty probe slot holds chunks")
    refs = cs[cs >= 0]
    if refs.numel() != p.rows or torch.unique(refs).numel() != p.rows:
        errors.append(f"chunk_slots must name each of the {p.rows} pool rows exactly once")
    return errors


# ---- export -----------------------------------------------------------------------------------


def export_for_inference(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """A serving copy of ``model``: every FiitedEmbeddingBagCollection becomes a FiitedInferenceEBC.

    ``model`` (a FiitedEmbeddingBagCollection, or e.g. a torchrec DLRM holding one or more) is
    not changed; the copy is in eval mode and shares no tensor with it.

    Args:
        model: the trained model.
        dtype: pool storage of the exported embeddings: "fp32" (bitwise equal outputs), "fp16"
            or "int8" (per-slot rowwise; error bounds in ``inference.quantize``).

    Returns:
        The exported copy (a FiitedInferenceEBC when ``model`` itself is a training module).

    Raises:
        ValueError: an unknown dtype, fp16 overflow, or a model with no FIITED module.

    Example::

        served = export_for_inference(dlrm, dtype="int8")
        logits = served(dense_features, kjt)   # fp32 [B, 1], as dlrm.eval() gives up to int8 error
    """
    check_dtype(dtype)
    found = [m for m in model.modules() if isinstance(m, FiitedEmbeddingBagCollection)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no FiitedEmbeddingBagCollection to export"
        )
    # Pre-seeding deepcopy's memo swaps each training module (and every reference to it) for
    # its export, so the training state is never copied.
    memo: Dict[int, Any] = {id(m): FiitedInferenceEBC.from_training(m, dtype) for m in found}
    return copy.deepcopy(model, memo).eval()


def kjt_dynamic_shapes(kjt: KeyedJaggedTensor, batch: Any, ids: Any) -> List[Optional[Dict[int, Any]]]:
    """``torch.export`` dynamic shapes of a fixed-batch KJT's pytree leaves (values, weights,
    lengths, offsets, stride_per_key_per_rank, inverse_indices): ``ids`` ids, ``batch`` bags per key."""
    F = len(kjt.keys())
    return [
        {0: ids},
        None if kjt.weights_or_none() is None else {0: ids},
        {0: F * batch},
        None if kjt.offsets_or_none() is None else {0: F * batch + 1},
        None,
        None,
    ]


def export_program(module: nn.Module, args: Tuple[Any, ...]) -> "torch.export.ExportedProgram":
    """``torch.export`` a served module with a dynamic batch size and dynamic id counts.

    Args:
        module: from ``export_for_inference`` (a FiitedInferenceEBC, or e.g. a DLRM over one).
        args: example inputs; every KJT gets dynamic ids and B, every tensor a dynamic dim 0 = B.

    Returns:
        The program; ``torch.export.save`` writes it. To serve it elsewhere::

            import torchrec                       # KJT / KeyedTensor pytree types
            import torchrec_fiited.ops.native     # registers torch.ops.fiited.* (no training code)
            program = torch.export.load(path)
            out = program.module()(kjt)           # any B >= 1, any number of ids

    Export is non-strict (torchrec's KJT splits by data-dependent lengths) and size-oblivious
    (``backed_size_oblivious``), so the program also serves B = 1, the size export would
    otherwise specialise away. The KJT checks that need the data are not part of the program;
    the shape checks and the op's own checks are.
    """
    batch = torch.export.Dim("batch", min=1, max=1 << 30)
    ids = torch.export.Dim("ids", min=0, max=1 << 40)
    shapes = [
        kjt_dynamic_shapes(a, batch, ids) if isinstance(a, KeyedJaggedTensor)
        else ({0: batch} if isinstance(a, torch.Tensor) else None)
        for a in args
    ]
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(module.eval(), tuple(args), dynamic_shapes=tuple(shapes), strict=False)


# ---- save / load ------------------------------------------------------------------------------


def _describe_ebc(module: nn.Module) -> Dict[str, Any]:
    return {"kind": "FiitedInferenceEBC", "spec": module.spec.to_dict()}


def _build_ebc(structure: Dict[str, Any], device: torch.device) -> nn.Module:
    return FiitedInferenceEBC(InferenceSpec.from_dict(structure["spec"]), device=device)


def _describe_dlrm(model: nn.Module) -> Dict[str, Any]:
    """DLRM's constructor arguments, read back from its layers."""
    ebc = model.sparse_arch.embedding_bag_collection
    dense = [p._linear for p in model.dense_arch.model._mlp]
    over_mlp, over_last = model.over_arch.model
    return {
        "kind": "DLRM",
        "embedding_bag_collection": describe(ebc),
        "dense_in_features": dense[0].in_features,
        "dense_arch_layer_sizes": [lin.out_features for lin in dense],
        "over_arch_layer_sizes": [p._linear.out_features for p in over_mlp._mlp]
        + [over_last.out_features],
    }


def _build_dlrm(structure: Dict[str, Any], device: torch.device) -> nn.Module:
    return DLRM(
        embedding_bag_collection=build(structure["embedding_bag_collection"], device),
        dense_in_features=structure["dense_in_features"],
        dense_arch_layer_sizes=list(structure["dense_arch_layer_sizes"]),
        over_arch_layer_sizes=list(structure["over_arch_layer_sizes"]),
        dense_device=device,
    )


# Exact types only: a subclass (DLRM_DCN, ...) takes other constructor arguments.
_ARCHS: Dict[str, Tuple[type, Callable, Callable]] = {
    "FiitedInferenceEBC": (FiitedInferenceEBC, _describe_ebc, _build_ebc),
    "DLRM": (DLRM, _describe_dlrm, _build_dlrm),
}


def describe(module: nn.Module) -> Dict[str, Any]:
    """JSON-able structure from which ``build`` makes an empty module of the same shape.

    Raises:
        ValueError: a module type with no entry in ``_ARCHS`` (named, with the supported ones).
    """
    for cls, describe_fn, _ in _ARCHS.values():
        if type(module) is cls:
            return describe_fn(module)
    hint = ""
    if any(isinstance(m, FiitedEmbeddingBagCollection) for m in module.modules()):
        hint = (
            "; it still holds a training FiitedEmbeddingBagCollection: call "
            "export_for_inference first"
        )
    raise ValueError(
        f"cannot save a {type(module).__name__}: supported types are {sorted(_ARCHS)}{hint}"
    )


def build(structure: Dict[str, Any], device: torch.device) -> nn.Module:
    """Inverse of ``describe``: the module with uninitialised tensors on ``device``."""
    kind = structure.get("kind")
    if kind not in _ARCHS:
        raise ValueError(f"unknown module kind {kind!r}; supported kinds are {sorted(_ARCHS)}")
    return _ARCHS[kind][2](structure, device)


def save_inference(module: nn.Module, path: PathLike) -> None:
    """Write an exported ``module`` to ``path`` atomically (a failed write keeps the old file).

    Args:
        module: a FiitedInferenceEBC, or a DLRM over one (from ``export_for_inference``).
        path: the file to write.

    Raises:
        ValueError: a module type that cannot be rebuilt, or one holding non-tensor state.
    """
    structure = json.dumps(describe(module), sort_keys=True)
    state = module.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"cannot save {type(module).__name__}: state {bad} is not a tensor")
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "structure": structure,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
    }
    _atomic_save(blob, os.fspath(path))


def _atomic_save(blob: Dict[str, Any], path: str) -> None:
    """torch.save into a temp file beside ``path``, fsync, then os.replace over it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the artifact from a server user
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_inference(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild a module written by ``save_inference`` from the file alone, in eval mode.

    Reads with ``torch.load(weights_only=True)``: no code from the file is run.

    Args:
        path: the file.
        device: where the tensors go.

    Raises:
        ValueError: naming ``path``, when the file is corrupt, truncated, not an inference file,
            of another version, or its tensors do not fit its structure.
    """
    path = os.fspath(path)
    blob = _read_blob(path, torch.device(device))
    try:
        # Built on meta and filled with assign=True: no throwaway initialisation.
        module = build(json.loads(blob["structure"]), torch.device("meta"))
        _check_dtypes(module.state_dict(), blob["state_dict"])
        module.load_state_dict(blob["state_dict"], strict=True, assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: inconsistent inference file: {type(err).__name__}: {err}") from err
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: inference file lacks tensors {left}")
    for name, m in module.named_modules():
        if isinstance(m, FiitedInferenceEBC):
            try:
                m.check_state()
            except ValueError as err:
                where = f" ({name})" if name else ""
                raise ValueError(f"{path}: inconsistent inference file{where}: {err}") from err
    return module.eval()


def _check_dtypes(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> None:
    # assign=True takes the file's tensors as they are, so their dtypes are checked first.
    for name, t in expected.items():
        if name in got and got[name].dtype != t.dtype:
            raise ValueError(f"tensor {name!r} has dtype {got[name].dtype} vs expected {t.dtype}")


def _read_blob(path: str, device: torch.device) -> Dict[str, Any]:
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # torch.load raises many types for a damaged file
        raise ValueError(
            f"{path}: not a readable torchrec_fiited inference file (corrupt or truncated?): "
            f"{type(err).__name__}: {err}"
        ) from err
    got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
    if got != FORMAT:
        raise ValueError(f"{path}: not a torchrec_fiited inference file: format {got!r} vs {FORMAT!r}")
    version = blob.get("version")
    if version == 1:
        raise ValueError(
            f"{path}: inference file version 1 (store v1: per-row chunk_slots [E, K]) is no longer "
            f"supported; this build reads version {VERSION} (a compact key probe per pool). "
            f"Re-export the trained model with export_for_inference and save_inference"
        )
    if version == 2:
        raise ValueError(
            f"{path}: inference file version 2 read its hashed fallbacks by mix64(key) % rows; "
            f"this build reads version {VERSION} (fallback buckets of the permuted id). "
            f"Re-export the trained model with export_for_inference and save_inference"
        )
    if version != VERSION:
        raise ValueError(f"{path}: inference file version {version!r} vs supported {VERSION}")
    return blob
