"""The sparse logical form of a table's VHPI state (store v2): its resident rows only.

Nothing in it scales with ``num_embeddings``: a table (or a shard of one) with n resident rows
is, with D and K the columns and chunks it holds:

    rows       int64 [n]     global row ids (``key_row`` of the entries' keys)
    weight     fp32  [n, D]  pruned chunks and dimensions as zeros
    live       uint8 [n, K]  1 where the chunk holds a slot
    utilities  fp32  [n, K]  as of last_step
    last_step  int32 [n]     the step the row's utilities are as of (>= 0: it is resident;
                             a store exports its utility base for every row)
    scores     fp32  [n]     its hash-table score: the row utility as of the last pruning
                             cycle, +inf for a row holding chunks (``VHPIStore.protect``)
    momentum   fp32  [n, K] (rowwise_adagrad) or [n, D] (adagrad); absent for sgd
    entries    int64 [n]     optional: the entry (hash-table slot) each row held

``entries`` only places the rows back where they were when the pool has the same geometry, so
a checkpoint of a plan resumes bitwise (ties between equal utilities and scores are broken by
entry order); without it, or where it does not fit, rows are inserted by key. Chunk slots are
not part of the form: loading allocates fresh ones. Nor are FIITED-2D column maps: loading keeps
the store's own and reads only the columns it stores.

``pad`` / ``unpad`` give the fixed-shape form ``torch.distributed.checkpoint`` loads in place:
every field padded to a capacity (the pool's entries, at most the table's rows) and a ``count``.

What the form leaves out is per pool, not per row, and sized by the plan: the utility sketch
and the hashed fallback (``pool_state`` / ``fallback_state``), saved beside it by a plan that
resumes itself.
"""

from collections import defaultdict
from typing import Dict, List, Mapping, Optional

import torch

from torchrec_fiited.ops.hash_reference import EMPTY_KEY, bucket_of
from torchrec_fiited.store.layout import NEVER_SEEN, entry_key, key_row
from torchrec_fiited.store.vhpi import VHPIStore

ROW_FIELDS = ("rows", "weight", "live", "utilities", "last_step", "scores")
_DTYPES = {
    "rows": torch.int64, "weight": torch.float32, "live": torch.uint8,
    "utilities": torch.float32, "last_step": torch.int32, "scores": torch.float32,
    "momentum": torch.float32, "entries": torch.int64,
}
# Optimizer state per chunk slot (one column per chunk) or per float (one per embedding column).
_MOMENTUM_PER_CHUNK = {"sgd": None, "rowwise_adagrad": True, "adagrad": False}


def fields(optimizer: str) -> List[str]:
    """The fields every table's form has (``entries`` is optional)."""
    out = list(ROW_FIELDS)
    if _MOMENTUM_PER_CHUNK[optimizer] is not None:
        out.append("momentum")
    return out


def momentum_per_chunk(optimizer: str) -> Optional[bool]:
    """Whether the optimizer state has a column per chunk (else per float; None for sgd)."""
    return _MOMENTUM_PER_CHUNK[optimizer]


def widths(store: VHPIStore, table: str) -> Dict[str, Optional[int]]:
    """Columns of each field of ``table``'s form (None: one value per row)."""
    layout = store.layouts[table]
    D, K = layout.dim, store.num_chunks
    out: Dict[str, Optional[int]] = {
        "rows": None, "weight": D, "live": K, "utilities": K, "last_step": None, "scores": None,
        "entries": None,
    }
    per_chunk = _MOMENTUM_PER_CHUNK[store.optimizer]
    if per_chunk is not None:
        out["momentum"] = K if per_chunk else D
    return out


def capacity(store: VHPIStore, table: str) -> int:
    """Rows ``table`` can hold resident: its pool's entries, at most its rows."""
    return min(store.entries_of(table).capacity, store.layouts[table].num_rows)


def export_table(store: VHPIStore, table: str) -> Dict[str, torch.Tensor]:
    """``table``'s resident rows in the sparse form, in entry order, with ``entries`` (new
    tensors; the store is not changed)."""
    et, pool = store.entries_of(table), store.pool_of(table)
    entries = store.table_entries(table)
    n, K, w = entries.numel(), store.num_chunks, pool.stored_width
    slots = et.chunk_slots[entries].to(torch.int64)
    live = slots >= 0
    safe = slots.clamp(min=0)
    weight = (pool.weights[safe] * live.unsqueeze(-1)).reshape(n, K * w)
    out = {
        "rows": key_row(et.keys_of(entries)),
        "weight": store.widen(table, weight),
        "live": live.to(torch.uint8),
        "utilities": et.utilities[entries].clone(),
        "last_step": et.utility_base.to(torch.int32).expand(n).clone(),
        "scores": et.index.scores[entries].clone(),
        "entries": entries.clone(),
    }
    per_chunk = _MOMENTUM_PER_CHUNK[store.optimizer]
    if per_chunk:  # rowwise: one value per slot
        out["momentum"] = pool.momentum[safe] * live
    elif per_chunk is not None:  # adagrad: per float, stored columns only
        m = (pool.momentum[safe] * live.unsqueeze(-1)).reshape(n, K * w)
        out["momentum"] = store.widen(table, m)
    return out


def pad(tensors: Mapping[str, torch.Tensor], cap: int) -> Dict[str, torch.Tensor]:
    """Every field padded (or holding) ``cap`` rows, plus ``count`` (int64 0-d) of real ones;
    padding rows are -1 in ``rows`` and ``entries``, zeros elsewhere."""
    n = int(tensors["rows"].numel())
    if n > cap:
        raise ValueError(f"{n} rows do not fit a padded form of {cap}")
    out = {}
    for name, t in tensors.items():
        fill = -1 if name in ("rows", "entries") else 0
        padded = t.new_full((cap,) + tuple(t.shape[1:]), fill)
        padded[:n] = t
        out[name] = padded
    out["count"] = torch.tensor(n, dtype=torch.int64)
    return out


def unpad(tensors: Mapping[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """The real rows of a ``pad``-ed form.

    Raises:
        ValueError: naming ``where``, for a count outside [0, rows].
    """
    n = int(tensors["count"])
    cap = int(tensors["rows"].shape[0])
    if not 0 <= n <= cap:
        raise ValueError(f"{where}: count {n} outside [0, {cap}]")
    return {name: t[:n] for name, t in tensors.items() if name != "count"}


def table_errors(store: VHPIStore, table: str, tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """What is wrong with ``tensors`` as ``table``'s sparse form (empty if nothing)."""
    where = f"table {table!r}"
    layout = store.layouts[table]
    rows = tensors.get("rows")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
        return [f"{where}: rows must be int64 [n], got {_describe(rows)}"]
    n = rows.numel()
    errors = []
    for name, width in widths(store, table).items():
        t = tensors.get(name)
        if name not in tensors and name == "entries":
            continue
        shape = (n,) if width is None else (n, width)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != _DTYPES[name]:
            errors.append(
                f"{where}: {name} must be {_DTYPES[name]} {list(shape)}, got {_describe(t)}"
            )
    unknown = sorted(set(tensors) - set(widths(store, table)))
    if unknown:
        errors.append(f"{where}: unknown fields {unknown}")
    if errors:
        return errors
    if n and not bool(layout.holds(rows).all()):
        lo, hi = layout.row_offset, layout.row_offset + layout.num_entries
        held = f"[{lo}, {hi})" if layout.row_block is None else (
            f"the hash range {list(layout.row_block)} of row_permutation over {layout.num_entries}")
        errors.append(
            f"{where}: rows must be in {held}, got [{int(rows.min())}, {int(rows.max())}]"
        )
    if torch.unique(rows).numel() != n:
        errors.append(f"{where}: a row appears twice")
    if bool(((tensors["live"] != 0) & (tensors["live"] != 1)).any()):
        errors.append(f"{where}: live holds values other than 0 and 1")
    if bool((tensors["last_step"] < 0).any()):
        errors.append(f"{where}: a resident row has last_step < 0")
    u = tensors["utilities"]
    if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
        errors.append(f"{where}: utilities must be finite and >= 0")
    s = tensors["scores"]  # +inf: a row holding chunks, which admission cannot displace
    if bool(torch.isnan(s).any()) or bool((s < 0).any()):
        errors.append(f"{where}: scores must be >= 0 (not NaN)")
    return errors


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return "nothing" if t is None else type(t).__name__


def import_errors(store: VHPIStore, tables: Mapping[str, Mapping[str, torch.Tensor]]) -> List[str]:
    """Why ``import_tables(store, tables)`` would fail (empty if it would not): the form of each
    table, then per pool whether every row finds an entry in its hash bucket and every live
    chunk a slot, beside the rows of the pool's tables that are not replaced."""
    unknown = sorted(set(tables) - set(store.layouts))
    if unknown:
        return [f"unknown tables {unknown}; this store holds {sorted(store.layouts)}"]
    errors = [e for name, t in tables.items() for e in table_errors(store, name, t)]
    if errors:
        return errors
    for pool, names in _by_pool(store, tables).items():
        et, cp = store.entries[pool], store.pools[pool]
        kept = _kept_entries(store, pool, names)
        keys = torch.cat([_keys(store, name, tables[name]["rows"]) for name in names]
                         + [et.keys_of(kept)])
        W = et.index.bucket_size
        per_bucket = torch.bincount(bucket_of(keys.cpu(), et.index.num_buckets),
                                    minlength=et.index.num_buckets)
        tables_of = store.tables_of_pool(pool)
        if keys.numel() and int(per_bucket.max()) > W:
            full = int((per_bucket > W).sum())
            errors.append(
                f"pool {pool!r} (tables {tables_of}): {keys.numel()} rows for {et.capacity} "
                f"entries, and {full} of its {et.index.num_buckets} hash buckets would need more "
                f"than {W}: load it with a larger budget or a plan that spreads these rows over "
                f"more ranks"
            )
        need = sum(int(tables[name]["live"].sum()) for name in names)
        need += int((et.chunk_slots[kept] >= 0).sum())
        if need > cp.capacity:
            errors.append(
                f"pool {pool!r} (tables {tables_of}) has {cp.capacity} slots, the checkpoint's "
                f"live chunks need {need}: load it with a larger budget or a plan that spreads "
                f"these rows over more ranks"
            )
    return errors


def import_tables(store: VHPIStore, tables: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Replace the resident rows of every table in ``tables`` with its sparse form.

    All-or-nothing: the form of every table and the room in every pool are checked first. Rows
    go back to their ``entries`` where every loaded row of a pool has one that is free, in its
    hash bucket and distinct; otherwise they are inserted by key. The pools' sketches and the
    tables' fallbacks are left as they are (``load_pool_state``, ``load_fallback_state``).

    Raises:
        ValueError: naming the table or pool, if anything does not fit; the store is unchanged.
    """
    errors = import_errors(store, tables)
    if errors:
        raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
    for pool, names in _by_pool(store, tables).items():
        _import_pool(store, pool, {name: tables[name] for name in names})


def _by_pool(store: VHPIStore, tables) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = defaultdict(list)
    for name in tables:
        out[store.layouts[name].pool].append(name)
    return dict(out)


def _keys(store: VHPIStore, table: str, rows: torch.Tensor) -> torch.Tensor:
    """Keys of global ``rows`` of ``table``."""
    return entry_key(store.layouts[table].table_index, rows.to(torch.int64))


def _kept_entries(store: VHPIStore, pool: str, replaced: List[str]) -> torch.Tensor:
    """Resident entries of ``pool``'s tables that are not in ``replaced``."""
    et = store.entries[pool]
    kept = [store.table_entries(t) for t in store.tables_of_pool(pool) if t not in replaced]
    if not kept:
        return torch.zeros(0, dtype=torch.int64, device=et.utilities.device)
    return torch.cat(kept)


def _clear(store: VHPIStore, pool: str, entries: torch.Tensor) -> None:
    """Make ``entries`` free: chunks back to the pool, keys out of the index (nothing goes to
    the sketch: the rows are being replaced, not displaced)."""
    et = store.entries[pool]
    r, k = (et.chunk_slots[entries] >= 0).nonzero(as_tuple=True)
    store.evict(pool, entries[r], k)
    et.index.keys[entries] = EMPTY_KEY
    et.index.scores[entries] = 0.0
    et.utilities[entries] = 0.0
    et.num_seen -= entries.numel()


def _placement(store: VHPIStore, pool: str, keys: torch.Tensor, forms) -> Optional[torch.Tensor]:
    """The saved entries of the rows, if every row has one that is usable as it stands."""
    et = store.entries[pool]
    if not all("entries" in f for f in forms):
        return None
    entries = torch.cat([f["entries"] for f in forms]).to(keys.device)
    S, W = et.capacity, et.index.bucket_size
    if entries.numel() == 0:
        return entries
    if int(entries.min()) < 0 or int(entries.max()) >= S:
        return None
    if torch.unique(entries).numel() != entries.numel():
        return None
    if bool((et.index.keys[entries] != EMPTY_KEY).any()):
        return None
    if not torch.equal(bucket_of(keys, et.index.num_buckets), entries // W):
        return None
    return entries


def _import_pool(
    store: VHPIStore, pool: str, tables: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    et, cp = store.entries[pool], store.pools[pool]
    device = et.utilities.device
    names = list(tables)
    _clear(store, pool, torch.cat([store.table_entries(t) for t in names]))
    forms = [{k: v.to(device) for k, v in tables[t].items()} for t in names]
    keys = torch.cat([_keys(store, t, f["rows"]) for t, f in zip(names, forms)])
    scores = torch.cat([f["scores"] for f in forms])
    entries = _placement(store, pool, keys, forms)
    if entries is None:
        entries, evicted, _ = et.index.insert(keys, scores)
        if evicted.numel() or bool((entries < 0).any()):  # import_errors checked the buckets
            raise RuntimeError(f"[torchrec_fiited] pool {pool!r}: a checked row did not fit")
    else:
        et.index.keys[entries] = keys
        et.index.scores[entries] = scores
    as_of = torch.cat([f["last_step"] for f in forms])
    if as_of.numel():
        # Stored against the rows' latest step: the scales stay <= 1 (no overflow for a form
        # saved long after the store's base), and a form of one base loads bitwise.
        et.rebase(int(as_of.max()))
    et.set_utilities(entries, torch.cat([f["utilities"] for f in forms]), as_of)
    et.num_seen += entries.numel()
    at = 0
    for table, f in zip(names, forms):
        mine = entries[at : at + f["rows"].numel()]
        at += f["rows"].numel()
        r, k = (f["live"] == 1).nonzero(as_tuple=True)
        store.allocate(pool, mine[r], k, 0)
        slots = et.chunk_slots[mine[r], k].to(torch.int64)
        n, K, w = mine.numel(), store.num_chunks, cp.stored_width
        cp.weights[slots] = store.narrow(table, f["weight"]).reshape(n, K, w)[r, k]
        if "momentum" in f:
            m = f["momentum"]
            if cp.momentum.dim() == 2:
                cp.momentum[slots] = store.narrow(table, m).reshape(n, K, w)[r, k]
            else:
                cp.momentum[slots] = m[r, k]


# ---- per pool and per table state outside the rows: sketch, counters, fallback --------------

def pool_state(store: VHPIStore, pool: str) -> Dict[str, torch.Tensor]:
    """The pool's utility sketch and last-cycle counters (shapes fixed by the pool's sizes)."""
    sk, et = store.sketches[pool], store.entries[pool]
    return {
        "sketch_counts": sk.counts.clone(),
        "sketch_decayed_to": sk.decayed_to.clone(),
        "last_cycle_evictions": et.last_cycle_evictions.clone(),
        "last_cycle_allocations": et.last_cycle_allocations.clone(),
    }


def fallback_state(store: VHPIStore, table: str) -> Dict[str, torch.Tensor]:
    """The table's hashed fallback (empty without one)."""
    if table not in store.fallbacks:
        return {}
    fb = store.fallbacks[table]
    return {"fallback_weights": fb.weights.clone(), "fallback_momentum": fb.momentum.clone()}


def _same_shape_errors(where: str, mine: Mapping[str, torch.Tensor], theirs) -> List[str]:
    errors = []
    for name, t in mine.items():
        got = theirs.get(name)
        if not isinstance(got, torch.Tensor) or got.shape != t.shape or got.dtype != t.dtype:
            errors.append(
                f"{where}: {name} must be {t.dtype} {list(t.shape)}, got {_describe(got)}"
            )
    return errors


def pool_state_errors(store: VHPIStore, pool: str, state: Mapping[str, torch.Tensor]) -> List[str]:
    """What keeps ``state`` from loading as ``pool``'s ``pool_state``."""
    errors = _same_shape_errors(f"pool {pool!r}", pool_state(store, pool), state)
    if not errors:
        c = state["sketch_counts"]
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            errors.append(f"pool {pool!r}: sketch_counts must be finite and >= 0")
    return errors


def fallback_state_errors(
    store: VHPIStore, table: str, state: Mapping[str, torch.Tensor]
) -> List[str]:
    """What keeps ``state`` from loading as ``table``'s ``fallback_state``."""
    return _same_shape_errors(f"table {table!r}", fallback_state(store, table), state)


def load_pool_state(store: VHPIStore, pool: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a checked ``pool_state`` into the pool."""
    sk, et = store.sketches[pool], store.entries[pool]
    sk.counts.copy_(state["sketch_counts"])
    sk.decayed_to.copy_(state["sketch_decayed_to"])
    et.last_cycle_evictions.copy_(state["last_cycle_evictions"])
    et.last_cycle_allocations.copy_(state["last_cycle_allocations"])


def load_fallback_state(store: VHPIStore, table: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a checked ``fallback_state`` into the table's fallback."""
    if table in store.fallbacks:
        store.fallbacks[table].weights.copy_(state["fallback_weights"])
        store.fallbacks[table].momentum.copy_(state["fallback_momentum"])


# ---- the plan-independent form: one sparse form per logical table ----------------------------

# State-dict key suffix of each field of a whole table's form, ``embedding_bags.<table>.<suffix>``.
_KEY_SUFFIX = {
    "rows": "fiited_rows",
    "weight": "weight",
    "live": "fiited_live",
    "utilities": "fiited_utilities",
    "last_step": "fiited_last_step",
    "scores": "fiited_scores",
    "momentum": "fiited_momentum",
}


def state_key(table: str, field: str) -> str:
    """The state-dict key of a whole table's ``field`` (plan-independent form)."""
    return f"embedding_bags.{table}.{_KEY_SUFFIX[field]}"


def merge_shards(parts: List[tuple]) -> Dict[str, torch.Tensor]:
    """One table's form from the forms of its shards: ``parts`` are (column offset, form).

    Rows are the union of the shards' rows, ascending; a shard fills its columns and chunks.
    Row shards are disjoint, so their merge is exact. Column shards of a row that is resident in
    some but not all of them read zeros (not live) in the others; ``last_step`` is the latest of
    the shards' (they agree unless one shard erased and readmitted the row) and ``scores`` the
    sum of the shards' (each scores its own chunks). ``entries`` are dropped (plan-specific).
    """
    parts = [(c0, f) for c0, f in parts]
    rows = torch.unique(torch.cat([f["rows"] for _, f in parts]))
    n = rows.numel()
    first = parts[0][1]
    cs = first["weight"].shape[1] // max(1, first["live"].shape[1])
    D = max(c0 + f["weight"].shape[1] for c0, f in parts)
    K = D // cs
    out = {
        "rows": rows,
        "weight": first["weight"].new_zeros(n, D),
        "live": first["live"].new_zeros(n, K),
        "utilities": first["utilities"].new_zeros(n, K),
        "last_step": first["last_step"].new_full((n,), NEVER_SEEN),
        "scores": first["scores"].new_zeros(n),
    }
    per_chunk = "momentum" in first and first["momentum"].shape[1] == first["live"].shape[1]
    if "momentum" in first:
        out["momentum"] = first["momentum"].new_zeros(n, K if per_chunk else D)
    for c0, f in parts:
        idx = torch.searchsorted(rows, f["rows"])
        w, k = f["weight"].shape[1], f["live"].shape[1]
        k0 = c0 // cs
        out["weight"][idx, c0 : c0 + w] = f["weight"]
        out["live"][idx, k0 : k0 + k] = f["live"]
        out["utilities"][idx, k0 : k0 + k] = f["utilities"]
        out["last_step"][idx] = torch.maximum(out["last_step"][idx], f["last_step"])
        out["scores"][idx] += f["scores"]
        if "momentum" in f:
            if per_chunk:
                out["momentum"][idx, k0 : k0 + k] = f["momentum"]
            else:
                out["momentum"][idx, c0 : c0 + w] = f["momentum"]
    return out


def export_logical(store: VHPIStore) -> Dict[str, torch.Tensor]:
    """The plan-independent form of every table of an unsharded store, keyed by ``state_key``."""
    out = {}
    for name, layout in store.layouts.items():
        form = merge_shards([(layout.chunk_offset * layout.chunk_size, export_table(store, name))])
        for field, t in form.items():
            out[state_key(layout.logical_name, field)] = t
    return out


def select_logical(store: VHPIStore, state: Mapping[str, torch.Tensor]):
    """Each local table's part of a plan-independent ``state``: its rows, columns and chunks.

    Returns (forms by local table, errors naming the table and field). Rows keep no entries
    (they are inserted by key); a whole-row score stands for a column shard's.
    """
    forms: Dict[str, Dict[str, torch.Tensor]] = {}
    errors: List[str] = []
    for name, layout in store.layouts.items():
        t = layout.logical_name
        got = {f: state.get(state_key(t, f)) for f in fields(store.optimizer)}
        missing = [state_key(t, f) for f, v in got.items() if not isinstance(v, torch.Tensor)]
        if missing:
            errors.append(f"table {t!r}: the state lacks {missing}")
            continue
        rows = got["rows"]
        if rows.dim() != 1 or any(v.shape[:1] != rows.shape for v in got.values()):
            errors.append(f"table {t!r}: every field must have one row per entry of "
                          f"{state_key(t, 'rows')} ({list(rows.shape)})")
            continue
        K, cs = store.num_chunks, layout.chunk_size
        c0, k0 = layout.chunk_offset * cs, layout.chunk_offset
        cols = {"weight": (c0, layout.dim), "live": (k0, K), "utilities": (k0, K)}
        if "momentum" in got:
            cols["momentum"] = (k0, K) if momentum_per_chunk(store.optimizer) else (c0, layout.dim)
        short = [f for f, (lo, w) in cols.items() if got[f].dim() != 2 or got[f].shape[1] < lo + w]
        if short:
            errors.append(f"table {t!r}: {short} have too few columns for the shard at column {c0}")
            continue
        keep = layout.holds(rows)
        form = {f: v[keep] for f, v in got.items()}
        for f, (lo, w) in cols.items():
            form[f] = form[f][:, lo : lo + w].contiguous()
        forms[name] = form
    return forms, errors
