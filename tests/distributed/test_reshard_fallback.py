"""distributed/fallback_pieces.py: a hashed fallback saved split one way loads split any other way,
bucket by bucket (the pieces a checkpoint's shards hold, cut and joined at new boundaries)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from torchrec_fiited.distributed.fallback_pieces import assemble_fallbacks, held_pieces
from torchrec_fiited.store import TableLayout
from torchrec_fiited.store.fallback import HashedFallback, bucket_width

E, D, WIDTH = 10_000, 4, bucket_width(10_000, 70)


def _shards(bounds, col_offset=0, dim=D):
    """One store per hash range [lo, hi) of ``bounds``, holding table "t"'s fallback there."""
    stores = []
    for lo, hi in zip(bounds, bounds[1:]):
        layout = TableLayout("t", E, dim, dim, "p", -0.1, 0.1, chunk_offset=col_offset // dim,
                             row_block=(lo, hi), fallback_width=WIDTH)
        fb = HashedFallback(layout.fallback_grid, dim, "rowwise_adagrad", (-0.1, 0.1), 5,
                            torch.device("cpu"), col_offset)
        stores.append(SimpleNamespace(store=SimpleNamespace(layouts={"t": layout},
                                                            fallbacks=nn.ModuleDict({"t": fb}))))
    return stores


def _trained(bounds):
    """Shards whose fallback rows are each table bucket's own values (as after training, where
    the copies of a cut bucket are equal)."""
    shards = _shards(bounds)
    for s in shards:
        fb = s.store.fallbacks["t"]
        bucket = torch.arange(fb.grid.first, fb.grid.first + fb.rows, dtype=torch.float32)
        fb.weights.copy_(bucket.unsqueeze(1) * 10 + torch.arange(D))
        fb.momentum.copy_(bucket + 0.5)
    return shards


def _pieces(shards):
    return held_pieces(SimpleNamespace(_lookups=shards))


@pytest.mark.parametrize("saved,loaded", [
    ([0, 5000, E], [0, 2500, 5000, 7500, E]),  # 2 -> 4
    ([0, 2500, 5000, 7500, E], [0, 3334, 6667, E]),  # 4 -> 3, boundaries inside buckets
    ([0, 5000, E], [0, E]),  # 2 -> 1
])
def test_a_split_fallback_loads_into_any_other_split(saved, loaded):
    pieces = _pieces(_trained(saved))
    targets = _shards(loaded)
    kept, restarted = assemble_fallbacks(SimpleNamespace(_lookups=targets), pieces)
    assert restarted == [] and len(kept) == len(targets)
    for (_, name, state), target in zip(kept, targets):
        grid = target.store.fallbacks[name].grid
        bucket = torch.arange(grid.first, grid.first + grid.rows, dtype=torch.float32)
        torch.testing.assert_close(state["fallback_weights"],
                                   bucket.unsqueeze(1) * 10 + torch.arange(D), rtol=0, atol=0)
        torch.testing.assert_close(state["fallback_momentum"], bucket + 0.5, rtol=0, atol=0)


def test_a_fallback_whose_buckets_or_columns_are_not_saved_restarts():
    pieces = _pieces(_trained([0, 5000, E]))
    pieces["t"] = pieces["t"][:1]  # the second half's buckets are missing
    kept, restarted = assemble_fallbacks(SimpleNamespace(_lookups=_shards([0, E])), pieces)
    assert kept == [] and restarted == ["t"]
    # Other columns (a column shard of width 2 at column 2) than the saved pieces hold.
    narrow = _shards([0, E], col_offset=2, dim=2)
    kept, restarted = assemble_fallbacks(SimpleNamespace(_lookups=narrow), _pieces(_trained([0, E])))
    assert kept == [] and restarted == ["t"]
