"""Export a trained FIITED model for serving, and save/load it without the training state.

Serving needs, per table, only the hash mapping (id -> entry), the live chunk addresses
``chunk_slots`` int32 [E, K] and the pools of live chunks: 4K bytes per entry of metadata, the
paper's K/D inference overhead. Utilities, ``last_step``, the live mask, the free stack and the
optimizer state are training-only and are dropped; the pools are compacted to their live chunks.

File format (``save_inference``): ``torch.save`` of a dict holding only plain Python values and
tensors, so ``load_inference`` reads it with ``torch.load(weights_only=True)`` (no pickled code):

    format       "torchrec_fiited.inference"
    version      1
    structure    JSON: how to rebuild the module ({"kind": "FiitedInferenceEBC", "spec": ...} or
                 {"kind": "DLRM", constructor args, "embedding_bag_collection": ...})
    state_dict   the module's tensors
"""

import contextlib
import copy
import dataclasses
import json
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
    quantize_rows,
    quantized_lookup,
    storage_layout,
)
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.modules.validation import check_ids, check_kjt, is_tracing
from torchrec_fiited.modules.vbe import written_out
from torchrec_fiited.ops import lookup_forward
from torchrec_fiited.store import PRUNED, VHPIStore, hash_ids

FORMAT = "torchrec_fiited.inference"
VERSION = 1
_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
PathLike = Union[str, "os.PathLike[str]"]


# ---- structure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceTable:
    """One served table.

    Args:
        name: table name.
        num_embeddings: E.
        embedding_dim: D = K * chunk_size of its pool.
        feature_names: features looked up in it, in output order.
        pooling: "SUM" or "MEAN" (a ``PoolingType`` name; anything but MEAN sums, as in training).
        pool: name of the compacted pool holding its live chunks.
        kept_columns: FIITED-2D tables only: the columns in [0, D / K) chunk k stores, K tuples of
            the pool's chunk_size each, ascending; the other columns read zeros. None: all.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Tuple[str, ...]
    pooling: str
    pool: str
    kept_columns: Optional[Tuple[Tuple[int, ...], ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if self.kept_columns is not None:
            object.__setattr__(self, "kept_columns", tuple(tuple(int(c) for c in k) for k in self.kept_columns))
        if self.pooling not in PoolingType.__members__:
            raise ValueError(
                f"table {self.name!r}: pooling must be one of {list(PoolingType.__members__)}, "
                f"got {self.pooling!r}"
            )


@dataclass(frozen=True)
class InferencePool:
    """One compacted pool: ``rows`` live chunks of ``chunk_size`` floats."""

    name: str
    rows: int
    chunk_size: int


@dataclass(frozen=True)
class InferenceSpec:
    """Everything but the tensors of a ``FiitedInferenceEBC`` (what its file stores as JSON).

    Args:
        tables: the tables, in output order.
        pools: the compacted pools.
        num_chunks: K.
        dtype: pool storage, "fp32", "fp16" or "int8" (see ``inference.quantize``).
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
        for t in self.tables:
            if t.pool not in chunk_size:
                raise ValueError(
                    f"table {t.name!r}: pool {t.pool!r} is not one of {sorted(chunk_size)}"
                )
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


class _TableSlots(nn.Module):
    """``chunk_slots`` int32 [E, K] of one table: compacted slot of chunk k of entry e, or -1."""

    def __init__(self, num_entries: int, num_chunks: int, device: torch.device) -> None:
        super().__init__()
        slots = torch.full((num_entries, num_chunks), PRUNED, dtype=torch.int32, device=device)
        self.register_buffer("chunk_slots", slots)


class _StoredPool(nn.Module):
    """``weights`` of one compacted pool, stored as ``inference.quantize.storage_layout`` says."""

    def __init__(self, pool: InferencePool, dtype: str, device: torch.device) -> None:
        super().__init__()
        shape, torch_dtype = storage_layout(pool.rows, pool.chunk_size, dtype)
        self.register_buffer("weights", torch.zeros(shape, dtype=torch_dtype, device=device))


class FiitedInferenceEBC(EmbeddingBagCollectionInterface):
    """Read-only, compacted FIITED embeddings for serving (build it with ``export_for_inference``).

    Same contract as the training ``FiitedEmbeddingBagCollection`` in eval mode: for F features
    with dims D_f, a KJT with batch size B gives a ``KeyedTensor`` with the same keys, order and
    ``length_per_key``, values fp32 [B, sum_f D_f]; pruned chunks read zeros. With dtype "fp32"
    the values are bitwise those of the training module; "fp16" and "int8" stay within the bounds
    documented in ``inference.quantize``. Ids are checked (or hashed) exactly as in training.

    Holds per table ``tables[t].chunk_slots`` int32 [E, K] and per pool ``pools[p].weights``
    ([n_live, chunk_size] fp32/fp16, or uint8 [n_live, chunk_size + 8] for int8), nothing else.
    A FIITED-2D pool stores only its kept columns (``InferenceTable.kept_columns``): its rows are
    [n_live, cs'], and the lookup scatters them into the D columns, the pruned ones reading zero.

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
        self.tables = nn.ModuleDict(
            {t.name: _TableSlots(t.num_embeddings, spec.num_chunks, device) for t in spec.tables}
        )
        self.pools = nn.ModuleDict({p.name: _StoredPool(p, spec.dtype, device) for p in spec.pools})
        # forward reads only these plain lists (one entry per feature, in output order), so the
        # module scripts, exports and FX-traces; the spec stays the Python-side description.
        features = [(f, t) for t in spec.tables for f in t.feature_names]
        self._feature_names: List[str] = [f for f, _ in features]
        self._feature_tables: List[str] = [t.name for _, t in features]
        self._feature_pools: List[str] = [t.pool for _, t in features]
        self._feature_rows: List[int] = [t.num_embeddings for _, t in features]
        self._feature_dims: List[int] = [t.embedding_dim for _, t in features]
        self._feature_mean: List[bool] = [t.pooling == "MEAN" for _, t in features]
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
        slots: Dict[str, torch.Tensor] = {}
        for name, slot_module in self.tables.items():
            slots[name] = slot_module.chunk_slots
        stored: Dict[str, torch.Tensor] = {}
        for name, pool in self.pools.items():
            stored[name] = pool.weights
        per_feature = features.to_dict()
        pooled: List[torch.Tensor] = []
        for i in range(len(self._feature_names)):
            jt = per_feature[self._feature_names[i]]
            table = self._feature_tables[i]
            entries = _entries(jt.values(), self._feature_names[i], table, self._feature_rows[i], self._hash_ids)
            weights: Optional[torch.Tensor] = None
            if self._weighted:
                weights = jt.weights().to(torch.float32)
            cols: Optional[torch.Tensor] = None
            if table in self._stored_columns:
                cols = self._stored_columns[table]
            pooled.append(_pool(
                stored[self._feature_pools[i]], self._dtype, slots[table], entries,
                jt.offsets().to(torch.int64), weights, self._feature_mean[i], self._feature_dims[i], cols,
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

    def nbytes(self) -> int:
        """Bytes of every tensor the module holds (chunk addresses plus pools)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @classmethod
    def from_training(
        cls, module: FiitedEmbeddingBagCollection, dtype: str = "fp32"
    ) -> "FiitedInferenceEBC":
        """Compact ``module``'s live chunks into a new serving module (``module`` is not changed)."""
        check_dtype(dtype)
        store = module.store
        slots: Dict[str, torch.Tensor] = {}
        stored: Dict[str, torch.Tensor] = {}
        pools = []
        for name, pool in store.pools.items():
            new_slots, rows = _compact_pool(store, name)
            slots.update(new_slots)
            stored[name] = quantize_rows(rows, dtype, f"pool {name!r}")
            pools.append(InferencePool(name, int(rows.shape[0]), pool.stored_width))
        tables = tuple(
            InferenceTable(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names),
                           t.pooling.name, store.layouts[t.name].pool, _kept_columns(store, t.name))
            for t in module.embedding_bag_configs()
        )
        spec = InferenceSpec(tables, tuple(pools), store.num_chunks, dtype,
                             bool(module.config.hash_ids), bool(module.is_weighted()))
        out = cls(spec, device=module.steps_done.device)
        for name, s in slots.items():
            out.tables[name].chunk_slots.copy_(s)
        for name, w in stored.items():
            out.pools[name].weights.copy_(w)
        return out.eval()


@torch.fx.wrap
def _checked(features: KeyedJaggedTensor, feature_names: List[str], is_weighted: bool) -> KeyedJaggedTensor:
    """The KJT of the module's features, checked as in training: keys of other modules are
    dropped and a VBE batch is written out to its padded equivalent (``modules/vbe.py``)."""
    check_kjt(features, feature_names, is_weighted)
    if list(features.keys()) == feature_names and not features.variable_stride_per_key():
        return features
    return written_out(features, feature_names)


@torch.fx.wrap
def _entries(ids: torch.Tensor, feature: str, table: str, num_entries: int, hashed: bool) -> torch.Tensor:
    """Entries int64 [n] of a feature's ids: hashed into [0, E), or checked to lie there (the
    check needs the data, so graph capture leaves it to the op's own bounds checks)."""
    ids = ids.to(torch.int64)
    if hashed:
        return hash_ids(ids, num_entries)
    if not torch.jit.is_scripting():
        if not is_tracing():
            check_ids(feature, table, ids, num_entries)
    return ids


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


@torch.fx.wrap
def _pool(
    stored: torch.Tensor,
    dtype: str,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    mean: bool,
    dim: int,
    stored_columns: Optional[torch.Tensor],
) -> torch.Tensor:
    """Pooled fp32 [B, D] of one feature: entries int64 [n], offsets int64 [B + 1].

    fp32 runs the training op itself (``torch.ops.fiited.lookup_forward``), so the output is
    bitwise the training module's; fp16/int8 dequantize (``inference.quantize``). A FIITED-2D
    table's stored columns are scattered into its D columns, the pruned ones reading zero.
    """
    if stored.shape[0] == 0:  # no live chunk at all: every chunk reads zero
        return torch.zeros(offsets.numel() - 1, dim, device=stored.device)
    if dtype == "fp32":
        if torch.jit.is_scripting():
            pooled = torch.ops.fiited.lookup_forward(stored, chunk_slots, entries, offsets, weights, mean)
        else:
            pooled = _eager_lookup(stored, chunk_slots, entries, offsets, weights, mean)
    else:
        pooled = quantized_lookup(stored, dtype, chunk_slots, entries, offsets, weights, mean)
    if stored_columns is None:
        return pooled
    out = pooled.new_zeros(pooled.shape[0], dim)  # pruned dimensions read zero
    return out.index_copy_(1, stored_columns.to(pooled.device), pooled)


def _kept_columns(store: VHPIStore, table: str) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """The table's FIITED-2D column map when its pool stores part of each chunk, else None."""
    if store.stored_columns(table) is None:
        return None
    return tuple(tuple(row) for row in store.dim_maps[table].kept.tolist())


def _compact_pool(store: VHPIStore, pool: str) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Renumber ``pool``'s live chunks to slots 0..n_live-1.

    Order is deterministic: tables in layout order, then entries ascending, then chunk_id, so the
    K chunks of an entry sit next to each other. Returns the new chunk_slots int32 [E, K] per
    table and the live rows fp32 [n_live, chunk_size] in new-slot order.
    """
    new_slots: Dict[str, torch.Tensor] = {}
    old: List[torch.Tensor] = []
    start = 0
    for table in store.tables_of_pool(pool):
        slots = store.tables[table].chunk_slots
        live = slots >= 0
        n = int(live.sum())
        fresh = torch.full_like(slots, PRUNED)
        fresh[live] = torch.arange(start, start + n, dtype=slots.dtype, device=slots.device)
        new_slots[table] = fresh
        old.append(slots[live].to(torch.int64))  # boolean indexing is row-major: entry, chunk_id
        start += n
    weights = store.pools[pool].weights
    rows = weights[torch.cat(old)] if old else weights[:0]
    return new_slots, rows.detach()


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
    if blob.get("version") != VERSION:
        raise ValueError(
            f"{path}: inference file version {blob.get('version')!r} vs supported {VERSION}"
        )
    return blob
