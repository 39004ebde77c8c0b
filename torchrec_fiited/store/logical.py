"""The logical, plan-independent form of a table's VHPI state, for checkpoints and resharding.

Per table, indexed by (global) row like a dense embedding table, so any row or column range of
it can be saved from one plan and loaded into another:

    weight     fp32  [E, D]  pruned chunks and dimensions as zeros (what a dense EBC would hold)
    live       uint8 [E, K]  1 where the chunk holds a slot
    utilities  fp32  [E, K]  as of last_step
    last_step  int32 [E, K]  the entry's last_step, repeated per chunk (NEVER_SEEN = -1), so a
                             column shard carries it too
    momentum   fp32  [E, K] (rowwise_adagrad) or [E, D] (adagrad); absent for sgd

Slots are not part of it: loading allocates fresh slots, so a checkpoint loads into any pool
that has room for its live chunks. Nor are FIITED-2D column maps: loading keeps the store's own
and reads only the columns it stores.
"""

from typing import Dict, List, Mapping, Tuple

import torch

from torchrec_fiited.store.layout import NEVER_SEEN
from torchrec_fiited.store.vhpi import VHPIStore

FIELDS = ("weight", "live", "utilities", "last_step")
# State-dict key suffix of each field, ``embedding_bags.<table>.<suffix>``: the weight under the
# key a dense EBC uses, so a dense table loads as "every chunk live".
_KEY_SUFFIX = {
    "weight": "weight",
    "live": "fiited_live",
    "utilities": "fiited_utilities",
    "last_step": "fiited_last_step",
    "momentum": "fiited_momentum",
}
# Optimizer state per chunk slot (one column per chunk) or per float (one per embedding column).
_MOMENTUM_PER_CHUNK = {"sgd": None, "rowwise_adagrad": True, "adagrad": False}


def state_key(table: str, field: str) -> str:
    """The state-dict key of ``table``'s logical ``field``."""
    return f"embedding_bags.{table}.{_KEY_SUFFIX[field]}"


def field_shapes(num_entries: int, dim: int, num_chunks: int, optimizer: str) -> Dict[str, Tuple[int, int]]:
    """Shapes of a table's logical tensors; no momentum for sgd."""
    E, D, K = num_entries, dim, num_chunks
    shapes = {"weight": (E, D), "live": (E, K), "utilities": (E, K), "last_step": (E, K)}
    per_chunk = _MOMENTUM_PER_CHUNK[optimizer]
    if per_chunk is not None:
        shapes["momentum"] = (E, K) if per_chunk else (E, D)
    return shapes


def per_chunk(field: str, optimizer: str) -> bool:
    """Whether ``field`` has one column per chunk (else one per embedding column)."""
    if field == "momentum":
        return bool(_MOMENTUM_PER_CHUNK[optimizer])
    return field != "weight"


def logical_shapes(store: VHPIStore, table: str) -> Dict[str, tuple]:
    """Shapes of ``table``'s logical tensors (local rows and columns)."""
    layout = store.layouts[table]
    return field_shapes(layout.num_entries, layout.dim, store.num_chunks, store.optimizer)


def export_table(store: VHPIStore, table: str) -> Dict[str, torch.Tensor]:
    """``table``'s logical tensors (new tensors; the store is not changed)."""
    et = store.tables[table]
    pool = store.pool_of(table)
    slots = et.chunk_slots.to(torch.int64)
    live = slots >= 0
    safe = slots.clamp(min=0)
    E, K = slots.shape
    out = {
        "weight": store.dense_weights(table),
        "live": live.to(torch.uint8),
        "utilities": et.utilities.clone(),
        "last_step": et.last_step.unsqueeze(1).expand(E, K).contiguous(),
    }
    if "momentum" in logical_shapes(store, table):
        m = pool.momentum[safe] * (live.unsqueeze(-1) if pool.momentum.dim() == 2 else live)
        m = m.reshape(E, -1)
        out["momentum"] = store.widen(table, m) if pool.momentum.dim() == 2 else m
    return out


def table_errors(store: VHPIStore, table: str, tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """What is wrong with ``tensors`` as ``table``'s logical state (empty if nothing)."""
    errors = []
    for name, shape in logical_shapes(store, table).items():
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            errors.append(f"table {table!r}: {name} must have shape {shape}, got {got}")
    if errors:
        return errors
    live, last = tensors["live"], tensors["last_step"]
    if bool(((live != 0) & (live != 1)).any()):
        errors.append(f"table {table!r}: live holds values other than 0 and 1")
    if bool((last != last[:, :1]).any()) or bool((last < NEVER_SEEN).any()):
        errors.append(f"table {table!r}: last_step differs across the chunks of a row or is < -1")
    if bool(((live == 1) & (last == NEVER_SEEN)).any()):
        errors.append(f"table {table!r}: a row never seen holds live chunks")
    u = tensors["utilities"]
    if not bool(torch.isfinite(u).all()) or bool((u < 0).any()):
        errors.append(f"table {table!r}: utilities must be finite and >= 0")
    return errors


def import_errors(store: VHPIStore, tables: Mapping[str, Mapping[str, torch.Tensor]]) -> List[str]:
    """Why ``import_tables(store, tables)`` would fail (empty if it would not)."""
    unknown = sorted(set(tables) - set(store.layouts))
    if unknown:
        return [f"unknown tables {unknown}; this store holds {sorted(store.layouts)}"]
    errors = [e for name, t in tables.items() for e in table_errors(store, name, t)]
    if errors:
        return errors
    need: Dict[str, int] = {}
    for name, t in tables.items():
        pool = store.layouts[name].pool
        need[pool] = need.get(pool, 0) + int(t["live"].sum())
    for pool, n in need.items():
        kept = sum(
            int((store.tables[name].chunk_slots >= 0).sum())
            for name in store.tables_of_pool(pool)
            if name not in tables
        )
        if n + kept > store.pools[pool].capacity:
            errors.append(
                f"pool {pool!r} (tables {store.tables_of_pool(pool)}) has {store.pools[pool].capacity} "
                f"slots, the checkpoint's live chunks need {n + kept}: load it with a larger budget "
                f"or a plan that spreads these rows over more ranks"
            )
    return errors


def import_tables(store: VHPIStore, tables: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Replace the state of every table in ``tables`` with its logical tensors.

    All-or-nothing: shapes, values and the room in each pool are checked for every table first.

    Raises:
        ValueError: naming the table or pool, if anything does not fit; the store is unchanged.
    """
    errors = import_errors(store, tables)
    if errors:
        raise ValueError("cannot load the FIITED checkpoint: " + "; ".join(errors))
    for name, t in tables.items():
        _import_table(store, name, t)


def _import_table(store: VHPIStore, table: str, t: Mapping[str, torch.Tensor]) -> None:
    et = store.tables[table]
    pool = store.pool_of(table)
    device = et.chunk_slots.device
    rows, ks = (et.chunk_slots >= 0).nonzero(as_tuple=True)
    store.evict(table, rows, ks)
    last = t["last_step"][:, 0].to(device=device, dtype=torch.int32)
    et.last_step.copy_(last)
    et.num_seen.fill_(int((last != NEVER_SEEN).sum()))
    et.utilities.copy_(t["utilities"].to(device))
    rows, ks = (t["live"].to(device) == 1).nonzero(as_tuple=True)
    store.allocate(table, rows, ks, 0)
    slots = et.chunk_slots[rows, ks].to(torch.int64)
    w = pool.stored_width
    weight = store.narrow(table, t["weight"].to(device)).reshape(et.num_entries, -1, w)
    pool.weights[slots] = weight[rows, ks]
    if "momentum" in t:
        m = t["momentum"].to(device)
        if pool.momentum.dim() == 2:
            pool.momentum[slots] = store.narrow(table, m).reshape(et.num_entries, -1, w)[rows, ks]
        else:
            pool.momentum[slots] = m[rows, ks]
