"""Smoke tests of benchmarks/bench_app_step.py and bench_cycle.py (issue 12) at tiny sizes: they
run the app's step and the pruning cycle on store v2 and the JSON carries what the acceptance
reads. The figures come from the full runs (README), not from here."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args, timeout=240):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", script), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_bench_app_step_compares_methods_to_full_at_equal_budgets(tmp_path):
    out = tmp_path / "app.json"
    _run("bench_app_step.py", "--quick", "--methods", "full", "fiited:0.25", "--rounds", "2",
         "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["emb"], r["budget"]) for r in rows] == [("full", None), ("fiited", 0.25)]
    full, fiited = rows
    assert full["x_full"] == 1.0 and full["embedding_bytes"] == full["embedding_bytes_full"]
    assert fiited["x_full"] == fiited["examples_per_second"] / full["examples_per_second"]
    # Every byte counted: budget 0.25 holds a quarter of the full collection (within 1%).
    assert abs(fiited["embedding_bytes"] / fiited["embedding_bytes_full"] - 0.25) < 0.0025
    assert fiited["steps"] == 3 and fiited["seconds"] > 0
    for r in rows:  # two rounds each, the fastest counts
        speeds = r["rounds_examples_per_second"]
        assert len(speeds) == 2 and speeds == sorted(speeds)
        assert r["examples_per_second"] == speeds[-1]
        # Each step timed alone: the steps add up to the run's time.
        assert len(r["step_seconds"]) == 3
        assert sum(r["step_seconds"]) == pytest.approx(r["seconds"])
    assert fiited["x_full_median_step"] == (full["median_step_seconds"]
                                            / fiited["median_step_seconds"])


def test_bench_app_step_interleaved_trains_what_separate_processes_train(tmp_path):
    """--interleave (every method in one process, steps alternating) times the same training:
    each method's losses equal those of its own process, step for step."""
    runs = {}
    for mode in ("separate", "interleaved"):
        out = tmp_path / f"{mode}.json"
        _run("bench_app_step.py", "--quick", "--methods", "full", "fiited:0.25", "adaembed:0.01",
             "--out", str(out), *(["--interleave"] if mode == "interleaved" else []))
        runs[mode] = json.loads(out.read_text())["rows"]
    for a, b in zip(runs["separate"], runs["interleaved"]):
        assert (a["emb"], a["budget"]) == (b["emb"], b["budget"])
        assert len(b["step_seconds"]) == 3 and b["losses"] == a["losses"], a["emb"]
        assert b["embedding_bytes"] == a["embedding_bytes"]


def test_bench_cycle_reports_cost_per_budget_and_sample_size(tmp_path):
    out = tmp_path / "cycle.json"
    p = _run("bench_cycle.py", "--quick", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["budget"], r["m"]) for r in rows] == [(0.05, 256), (0.05, 1024), (0.25, 256),
                                                     (0.25, 1024)]
    for r in rows:
        assert r["cycle_ms"] > 0 and r["step_ms"] > 0 and r["resident"] > 0
        assert r["pct_of_1000_steps"] == pytest.approx(r["cycle_ms"] / (10 * r["step_ms"]))
    # A larger budget holds more resident entries: the curve's other axis.
    assert rows[2]["resident"] > rows[0]["resident"]
    assert "% of 1000 steps" in p.stdout
