"""Hashed-fallback buckets in transit: the pieces saved or held by a plan's shards, and a new
plan's (or an unsharded collection's) fallbacks assembled from them bucket by bucket
(``store/fallback.py``: a table's fallback is one function of the id under every plan)."""

from typing import Dict, List, Optional

import torch

from torchrec_fiited.store.logical import fallback_state


class FallbackPiece:
    """A fallback's buckets [first, first + rows) of columns [col, col + width): its ``state``
    (``fallback_weights``, ``fallback_momentum``), or ``read`` to load it on first use."""

    def __init__(self, first: int, rows: int, col: int, width: int, read=None,
                 state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        self.first, self.rows, self.col, self.width = first, rows, col, width
        self._read, self._state = read, state

    def state(self) -> Dict[str, torch.Tensor]:
        if self._state is None:
            self._state = self._read()
        return self._state


def held_pieces(module) -> Dict[str, List[FallbackPiece]]:
    """Per logical table, the fallbacks ``module`` (a collection, or a sharded one: its local
    lookups) holds, as pieces with their state on the CPU (picklable: they travel between
    ranks)."""
    pieces: Dict[str, List[FallbackPiece]] = {}
    for lookup in getattr(module, "_lookups", [module]):
        for name, fb in lookup.store.fallbacks.items():
            layout = lookup.store.layouts[name]
            state = {f: t.detach().cpu() for f, t in fallback_state(lookup.store, name).items()}
            pieces.setdefault(layout.logical_name, []).append(FallbackPiece(
                fb.grid.first, fb.rows, layout.chunk_offset * layout.chunk_size,
                fb.weights.shape[1], state=state))
    return pieces


def assemble_fallbacks(module, pieces: Dict[str, list]):
    """(store, local table, fallback state) for each local fallback whose buckets and columns
    the saved pieces cover (bucket by bucket: the copies of a bucket cut by a shard boundary
    are equal, ``HashedFallback.flush``), and the logical tables whose fallback restarts."""
    kept, restarted = [], []
    for lookup in getattr(module, "_lookups", [module]):
        store = lookup.store
        for name, layout in store.layouts.items():
            if name not in store.fallbacks:
                continue
            table, mine = layout.logical_name, fallback_state(store, name)
            grid = store.fallbacks[name].grid
            col, width = layout.chunk_offset * layout.chunk_size, layout.dim
            out = {f: t.clone() for f, t in mine.items()}
            covered = torch.zeros(grid.rows, dtype=torch.bool)
            for piece in pieces.get(table, []):
                lo = max(grid.first, piece.first)
                hi = min(grid.first + grid.rows, piece.first + piece.rows)
                if piece.col != col or piece.width != width or lo >= hi:
                    continue
                theirs = piece.state()
                for f, t in out.items():
                    if t.numel():
                        t[lo - grid.first : hi - grid.first] = theirs[f][lo - piece.first : hi - piece.first]
                covered[lo - grid.first : hi - grid.first] = True
            if bool(covered.all()):
                kept.append((store, name, out))
            else:
                restarted.append(table)
    return kept, restarted
