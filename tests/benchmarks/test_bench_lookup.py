"""Smoke test of benchmarks/bench_lookup.py (issue 11, acceptance 5) at tiny sizes: TBE, the
module and the bare ops run on store v2 in one process and the JSON carries the ratios and the
pruning-cycle fraction the acceptance reads. The figures come from the full run, not from here."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_lookup.py")


def test_bench_lookup_runs_on_store_v2_and_reports_the_fields(tmp_path):
    out = tmp_path / "lookup.json"
    cmd = [sys.executable, SCRIPT, "--quick", "--in-process", "--pooling-factors", "1",
           "--budgets", "0.01", "--iterations", "1", "--threads", "1",
           "--paths", "tbe", "fiited", "fiited-ops", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {(x["path"], x["budget"]): x for x in r["rows"]}
    assert set(rows) == {("tbe", 0.0), ("fiited", 0.01), ("fiited-ops", 0.01)}
    tbe, mod, ops = rows["tbe", 0.0], rows["fiited", 0.01], rows["fiited-ops", 0.01]
    assert tbe["step_x_tbe"] == 1.0 and all(x["L"] == 1 for x in r["rows"])
    for x in (mod, ops):
        assert x["K"] == 4 and x["step_s"] > 0 and x["fwd_s"] > 0
        for k in ("live_fraction", "resident_fraction", "read_fraction"):
            assert 0.0 <= x[k] <= 1.0, (k, x[k])
        # At budget 0.01 only part of the ids are resident, and a chunk read needs an entry.
        assert 0.0 < x["read_fraction"] <= x["resident_fraction"] < 1.0
    assert mod["prune_s"] > 0
    assert mod["prune_pct_of_interval"] == 100 * mod["prune_s"] / (1000 * mod["step_s"])
    assert mod["meets_acceptance"] == (mod["step_x_tbe"] >= 1.0
                                       and mod["prune_pct_of_interval"] <= 2.0)
    assert "meets #11.5" in p.stdout
