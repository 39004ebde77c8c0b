"""Load a DCP checkpoint of FIITED collections saved under another plan or world size.

A checkpoint holds each shard's resident rows (``logical_state.py``: ``...fiited_shard.<r>_<c>.*``,
padded, with a ``count``), keyed by global row and column, so any rank can tell which saved rows
it now owns: every rank reads the saved shards of the tables it holds, one shard at a time, keeps
the rows its new shards hold (a block of rows, a hash range, or every row) and the columns of its
column shards, and loads the merge through the plan-independent path of ``load_state_dict`` (all
ranks load or none does, errors naming rank, table and pool). Memory: this rank's new resident
rows plus one saved shard; nothing is sized by ``num_embeddings``. Reads: each rank reads the
shards of its tables whole (DCP deserializes stored items whole), so I/O is at most world size x
the FIITED part of the checkpoint.

What belongs to a plan restarts: each pool's utility sketch (non-resident ids' estimates). With
``miss="hashed"``, a table's fallback is one function of the id under every plan (buckets of the
permuted id, ``store/fallback.py``): each new shard takes the buckets that meet its rows from
the saved shards that hold them, bit for bit, whatever the old and new row splits; only a
column split that differs (other column widths) restarts it (logged, and returned). The
resident rows, their chunks, utilities, optimizer state and the step count carry over.
"""

import logging
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchrec_fiited.distributed.fallback_pieces import (
    FallbackPiece,
    assemble_fallbacks,
    held_pieces,
)
from torchrec_fiited.distributed.gather import SHARD_KEY
from torchrec_fiited.distributed.logical_state import shard_key_prefix
from torchrec_fiited.store.fallback import FallbackGrid
from torchrec_fiited.store.logical import (
    fields,
    load_fallback_state,
    merge_shards,
    state_key,
    unpad,
)

log = logging.getLogger(__name__)

_SavedShard = Tuple[int, int, Dict[str, TensorStorageMetadata]]


def checkpoint_metadata(checkpoint_id: str) -> Dict[str, Any]:
    """DCP's per-key metadata of a checkpoint (read once per load)."""
    return dict(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)


def saved_shards(md: Dict[str, Any], prefix: str) -> Dict[str, List[_SavedShard]]:
    """Per table, the shards a checkpoint (its metadata ``md``) holds under ``prefix``: (first
    row or hash-range start, first column, field -> storage metadata)."""
    shards: Dict[Tuple[str, int, int], Dict[str, TensorStorageMetadata]] = {}
    for key, meta in md.items():
        m = SHARD_KEY.match(key)
        if m and m.group(1) == prefix and isinstance(meta, TensorStorageMetadata):
            shards.setdefault((m.group(2), int(m.group(3)), int(m.group(4))), {})[m.group(5)] = meta
    out: Dict[str, list] = {}
    for (table, row, col), metas in sorted(shards.items()):
        out.setdefault(table, []).append((row, col, metas))
    return out


def _read(checkpoint_id: str, keys: Dict[str, TensorStorageMetadata]) -> Dict[str, torch.Tensor]:
    """The saved tensors at ``keys``, read by this rank alone."""
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in keys.items()}
    dcp.load(state, checkpoint_id=checkpoint_id, no_dist=True)
    return state


def resharded_state(
    module, checkpoint_id: str, prefix: str, md: Dict[str, Any]
) -> Dict[str, torch.Tensor]:
    """The plan-independent state (``state_key`` form) of the tables ``module`` (a
    ``ShardedFiitedEmbeddingBagCollection``, or an unsharded ``FiitedEmbeddingBagCollection``)
    holds on this rank, restricted to its rows, from a checkpoint saved under any plan;
    ``prefix`` is the collection's key prefix in it, ``md`` its metadata.

    Raises:
        ValueError: a table of this rank that the checkpoint lacks, or a malformed saved shard
            (naming the table and shard).
    """
    stores = [lookup.store for lookup in getattr(module, "_lookups", [module])]
    layouts = [lo for store in stores for lo in store.layouts.values()]
    mine: Dict[str, list] = {}
    for lo in layouts:
        mine.setdefault(lo.logical_name, []).append(lo)
    saved = saved_shards(md, prefix)
    names = fields(stores[0].optimizer) + ["count"]
    out: Dict[str, torch.Tensor] = {}
    for table, held in mine.items():
        if table not in saved:
            raise ValueError(f"table {table!r}: the checkpoint at {checkpoint_id!r} holds no shard "
                             f"of it under {prefix!r}")
        parts = []
        for row, col, metas in saved[table]:
            where = f"table {table!r} shard {row}_{col}"
            lacking = sorted(set(names) - set(metas))
            if lacking:
                raise ValueError(f"{where}: the checkpoint lacks {lacking}")
            keys = {f: prefix + shard_key_prefix(table, row, col) + f for f in names}
            got = _read(checkpoint_id, {keys[f]: metas[f] for f in names})
            form = unpad({f: got[keys[f]] for f in names}, where)
            keep = torch.zeros_like(form["rows"], dtype=torch.bool)
            for lo in held:
                keep |= lo.holds(form["rows"])
            parts.append((col, {f: t[keep] for f, t in form.items()}))
        for field, tensor in merge_shards(parts).items():
            out[state_key(table, field)] = tensor
    steps = prefix + "steps_done"
    if steps not in md:
        raise ValueError(f"the checkpoint at {checkpoint_id!r} has no {steps!r}")
    out["steps_done"] = _read(checkpoint_id, {steps: md[steps]})[steps]
    return out


def load_resharded(sharded, checkpoint_id: str, prefix: str = "") -> List[str]:
    """Load into ``sharded`` (every rank calls this; or an unsharded collection in one
    process) the FIITED state a DCP checkpoint saved under any plan or world size (see the
    module docstring for what restarts).

    Returns:
        the tables of this rank whose hashed fallback restarted (their columns were split
        differently), also logged as a warning.

    Raises:
        ValueError: on every rank, naming rank, table and pool, when a rank's new pools cannot
            hold its rows (and nothing is loaded anywhere), or the checkpoint lacks a table.
    """
    errors: List[str] = []
    state: Dict[str, torch.Tensor] = {}
    fallbacks: List[Tuple[Any, str, Dict[str, torch.Tensor]]] = []
    restarted: List[str] = []
    try:
        md = checkpoint_metadata(checkpoint_id)
        saved = saved_shards(md, prefix)
        layouts = [lo for lookup in getattr(sharded, "_lookups", [sharded])
                   for lo in lookup.store.layouts.values()]
        if saved:
            state = resharded_state(sharded, checkpoint_id, prefix, md)
            pieces = _saved_fallback_pieces(checkpoint_id, prefix, saved, layouts)
        else:  # saved by an unsharded collection: its own store layout
            state, template = _unsharded_state(sharded, checkpoint_id, prefix, md)
            pieces = held_pieces(template)
        fallbacks, restarted = assemble_fallbacks(sharded, pieces)
    except ValueError as e:
        errors.append(str(e))
    if hasattr(sharded, "_errors_of_all_ranks"):
        errors = sharded._errors_of_all_ranks(errors)
    if errors:
        raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
    if hasattr(sharded, "_lookups"):
        sharded.load_state_dict(state, strict=False)
    else:  # one process: the plan-independent form straight into the store
        from torchrec_fiited.distributed.gather import load_logical_tables

        load_logical_tables(sharded, state)
    for store, table, fallback in fallbacks:
        load_fallback_state(store, table, fallback)
    if restarted:
        log.warning("hashed fallbacks restart under the new plan (their columns were split "
                    "differently): tables %s", sorted(set(restarted)))
    return sorted(set(restarted))


def _saved_fallback_pieces(checkpoint_id: str, prefix: str, saved, layouts) -> Dict[str, list]:
    """Per logical table with a fallback here, the saved shards' fallback pieces. A saved row
    shard holds the hash range from its start to the next shard's (of its column), and the
    buckets of width ``fallback_width`` that meet it; a piece whose rows disagree is left out
    (the fallback then restarts)."""
    pieces: Dict[str, list] = {}
    for lo in layouts:
        table, width = lo.logical_name, lo.fallback_width
        if table in pieces or not width:
            continue
        pieces[table] = []
        shards = saved.get(table, [])
        for row, col, metas in shards:
            meta = metas.get("fallback_weights")
            if meta is None:
                continue
            ends = sorted(r for r, c, _ in shards if c == col and r > row)
            grid = FallbackGrid(lo.num_entries, width, row, ends[0] if ends else lo.num_entries)
            if grid.rows != meta.size[0]:
                continue
            base = prefix + shard_key_prefix(table, row, col)
            keys = {f: base + f for f in ("fallback_weights", "fallback_momentum") if f in metas}

            def read(keys=keys, metas=metas) -> Dict[str, torch.Tensor]:
                got = _read(checkpoint_id, {k: metas[f] for f, k in keys.items()})
                return {f: got[k] for f, k in keys.items()}

            pieces[table].append(FallbackPiece(grid.first, grid.rows, col, meta.size[1], read))
    return pieces


def _unsharded_state(
    module, checkpoint_id: str, prefix: str, md: Dict[str, Any]
) -> Dict[str, torch.Tensor]:
    """The plan-independent state of a checkpoint an unsharded ``FiitedEmbeddingBagCollection``
    saved under ``prefix``: read into a collection of the same tables and config (its budget's
    bytes; nothing sized by the id space) and exported; and that collection (its fallbacks)."""
    from torchrec_fiited.distributed.gather import logical_tables
    from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

    tables = getattr(module, "_tables", None) or module.embedding_bag_configs()
    config = getattr(module, "_config", None) or module.config
    template = FiitedEmbeddingBagCollection(tables, config)
    own = template.state_dict()
    lacking = sorted(k for k, v in own.items()
                     if isinstance(v, torch.Tensor) and prefix + k not in md)
    if lacking:
        raise ValueError(f"the checkpoint at {checkpoint_id!r} holds neither FIITED shards nor an "
                         f"unsharded collection under {prefix!r} (lacks {lacking[:3]})")
    target = {prefix + k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
    dcp.load(target, checkpoint_id=checkpoint_id, no_dist=True)
    template.load_state_dict({k: target.get(prefix + k, v) for k, v in own.items()})
    return logical_tables(template), template
