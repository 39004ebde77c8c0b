"""DCP of a 10^9-row FIITED table at budget 1e-4: saved at 2 ranks (row-wise by hash range),
loaded at 1 (table-wise) and at 4 (row-wise). Nothing is sized by the id space: a dense table
would be 64 GB, one byte per row 1 GB; each rank's state is its share of 6.8 MB."""

import torch

from tests.distributed import cases
from tests.distributed.harness import run_ranks

BUDGET_BYTES = 1e-4 * cases.HUGE_ROWS * (cases.HUGE_DIM + 1) * 4  # fp32 rows + rowwise Adagrad


def test_a_billion_row_table_saves_at_two_ranks_and_loads_at_one_and_four(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_ranks(cases.huge_table_dcp, 2, "row_wise", path, True)
    assert all(r["resident"] > 1000 for r in saved)  # trained: rows resident on both ranks
    for r in saved:
        assert r["bytes"] <= BUDGET_BYTES / 2
        assert r["rss_added_mb"] < 64, r["rss_added_mb"]  # the save's peak above training's
    want = saved[0]["outputs"]
    assert want.abs().sum() > 0
    for world_size, kind in ((1, "table_wise"), (4, "row_wise")):
        loaded = run_ranks(cases.huge_table_dcp, world_size, kind, path, False)
        assert sum(r["resident"] for r in loaded) == sum(r["resident"] for r in saved)
        for r in loaded:
            assert r["bytes"] <= BUDGET_BYTES / world_size
            assert r["rss_added_mb"] < 64, (world_size, r["rss_added_mb"])
        torch.testing.assert_close(loaded[0]["outputs"], want, rtol=0, atol=0)
