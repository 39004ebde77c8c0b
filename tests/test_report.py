"""The report tool: table values by hand, plots, malformed inputs and the CLI."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_fiited import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FULL_BYTES = 1000


def _metrics(emb, budget, seed, auc, acc=0.7, bytes_=FULL_BYTES, eps=1000.0, dataset="criteo", **extra):
    return {
        "test_auc": auc, "test_accuracy": acc, "test_logloss": 0.45, "test_ne": 0.9,
        "embedding_bytes": bytes_, "embedding_bytes_full": FULL_BYTES, "budget": budget,
        "emb": emb, "dataset": dataset, "seed": seed, "steps": 100, "train_seconds": 2.0,
        "examples_per_second": eps, **extra,
    }


def _allocation(tables=("t_a", "t_b"), k=2):
    """Three snapshots; rows drift from all-live towards fewer live chunks."""
    snaps = []
    for i, step in enumerate([10, 20, 30]):
        snaps.append({"step": step, "tables": {
            name: [i * (j + 1), 5 - i, 10 * (j + 1)][: k + 1] for j, name in enumerate(tables)}})
    return snaps


def _write(root: Path, job: int, metrics, raw: str = None) -> Path:
    """A Hydra-multirun-like path: root/multirun/<date>/<time>/<job>/metrics.json."""
    path = root / "multirun" / "2024-05-01" / "12-00-00" / str(job) / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(raw if raw is not None else json.dumps(metrics))
    return path


RUNS = [
    _metrics("full", 1.0, 0, 0.80, acc=0.70),
    _metrics("full", 1.0, 1, 0.82, acc=0.72),
    _metrics("fiited", 0.5, 0, 0.805, bytes_=200, eps=1000.0, chunk_allocation=_allocation()),
    _metrics("fiited", 0.5, 1, 0.809, bytes_=250, eps=1200.0, chunk_allocation=_allocation()),
    _metrics("fiited", 0.1, 0, 0.79, bytes_=100, chunk_allocation=_allocation()),
    _metrics("fiited", 0.1, 1, 0.80, bytes_=100, chunk_allocation=_allocation()),
    _metrics("mixed_dim", 0.5, 0, 0.78, bytes_=400, chunk_allocation=[]),
]


@pytest.fixture
def run_dir(tmp_path):
    for i, m in enumerate(RUNS):
        _write(tmp_path, i, m)
    _write(tmp_path, 90, None, raw="{not json")
    broken = dict(RUNS[0])
    del broken["test_ne"]
    _write(tmp_path, 91, broken)
    return tmp_path


def _table_rows(md: str):
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in r))) for r in rows[1:]]


def test_table_values_by_hand(run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        report.main([str(run_dir), "--out", str(out)])
    rows = _table_rows((out / "report.md").read_text())
    assert [(r["emb"], r["budget"]) for r in rows] == [
        ("fiited", "0.5"), ("fiited", "0.1"), ("full", "1"), ("mixed_dim", "0.5")]
    fiited = rows[0]
    assert fiited["seeds"] == "2"
    assert fiited["AUC"] == f"0.8070 ± {statistics.stdev([0.805, 0.809]):.4f}"
    assert fiited["ΔAUC vs full"] == "-0.0030"  # 0.807 - mean(0.80, 0.82)
    assert fiited["reduction (x)"] == f"4.50 ± {statistics.stdev([5.0, 4.0]):.2f}"  # 1000/200, 1000/250
    assert fiited["examples/s"] == f"1,100 ± {statistics.stdev([1000, 1200]):,.0f}"
    assert rows[1]["ΔAUC vs full"] == "-0.0150"  # 0.795 - 0.81
    assert rows[2]["ΔAUC vs full"] == "+0.0000"
    assert rows[2]["accuracy"] == f"0.7100 ± {statistics.stdev([0.70, 0.72]):.4f}"
    assert rows[3]["AUC"] == "0.7800 ± 0.0000" and rows[3]["reduction (x)"] == "2.50 ± 0.00"
    assert rows[3]["ΔAUC vs full"] == "-0.0300"
    messages = [str(w.message) for w in caught]
    assert any("90" in m and "metrics.json" in m and "invalid JSON" in m for m in messages)
    assert any("91" in m and "missing required keys ['test_ne']" in m for m in messages)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_are_valid_pngs(run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        report.main([str(run_dir), "--out", str(out)])
    expected = ["auc_vs_reduction.png", "accuracy_vs_reduction.png",
                "chunk_allocation_fiited_b0.5.png", "chunk_allocation_fiited_b0.1.png"]
    for name in expected:
        assert _is_png(out / name), name
        assert f"]({name})" in (out / "report.md").read_text()
    # mixed_dim recorded no snapshots, and full none at all.
    assert sorted(p.name for p in out.glob("chunk_allocation_*")) == sorted(expected[2:])


def test_out_defaults_to_first_dir_and_datasets_get_suffixes(tmp_path):
    for i, m in enumerate(RUNS[:3]):
        _write(tmp_path, i, m)
    _write(tmp_path, 10, _metrics("full", 1.0, 0, 0.7, dataset="avazu"))
    _write(tmp_path, 11, _metrics("fiited", 0.5, 0, 0.69, bytes_=300, dataset="avazu",
                                  chunk_allocation=_allocation(tables=[f"t{i}" for i in range(12)], k=1)))
    report.main([str(tmp_path)])
    for name in ["auc_vs_reduction_criteo.png", "auc_vs_reduction_avazu.png",
                 "accuracy_vs_reduction_avazu.png", "chunk_allocation_avazu_fiited_b0.5.png",
                 "chunk_allocation_criteo_fiited_b0.5.png", "report.md"]:
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _table_rows((tmp_path / "report.md").read_text())
    assert [r["dataset"] for r in rows] == ["avazu", "avazu", "criteo", "criteo"]
    assert rows[0]["ΔAUC vs full"] == "-0.0100"  # avazu's own full run, not criteo's


def test_missing_full_gives_na_and_bad_allocation_warns(tmp_path):
    bad = _metrics("fiited", 0.5, 0, 0.8, bytes_=500, chunk_allocation=[{"step": "x"}])
    _write(tmp_path, 0, bad)
    with pytest.warns(UserWarning, match=r"metrics\.json: chunk_allocation\[0\] needs an int 'step'"):
        report.main([str(tmp_path)])
    assert _table_rows((tmp_path / "report.md").read_text())[0]["ΔAUC vs full"] == "n/a"
    assert not list(tmp_path.glob("chunk_allocation_*"))


def test_nothing_found_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert e.value.code != 0
    assert f"no metrics.json found under {tmp_path}" in capsys.readouterr().err


def test_only_malformed_files_is_an_error(tmp_path, capsys):
    _write(tmp_path, 0, None, raw="[1, 2]")
    with pytest.warns(UserWarning, match="expected a JSON object, got list"):
        with pytest.raises(SystemExit):
            report.main([str(tmp_path)])
    assert "none of the 1 metrics.json files found is valid" in capsys.readouterr().err


def test_runs_as_module(run_dir, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "torchrec_fiited.report", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stderr and (out / "report.md").is_file()


def test_largest_reduction_within_tolerance_and_active_dims(tmp_path):
    dims = {"tables": {"a": {"active_dim": 8}, "b": {"active_dim": 10}}}
    runs = [_metrics("full", 1.0, 0, 0.800), _metrics("fiited", 0.5, 0, 0.799, bytes_=500),
            _metrics("fiited", 0.1, 0, 0.797, bytes_=200),  # 0.003 below full: too far
            _metrics("fiited_2d", 0.1, 0, 0.7985, bytes_=150, fiited_stats=dims)]
    for i, m in enumerate(runs):
        _write(tmp_path, i, m)
    groups = report.summarize(report.load_runs(report.find_metrics([tmp_path])))
    best = report.best_within(groups, 0.002)
    assert [(g.emb, g.budget) for g in best] == [("fiited", 0.5), ("fiited_2d", 0.1)]
    lines = report.best_lines(groups, 0.002)
    assert "- criteo fiited_2d: budget 0.1, ΔAUC -0.0015, reduction 6.67 ± 0.00x, D_active 9.0" in lines
    rows = {r["emb"] + r["budget"]: r for r in _table_rows(report.markdown_table(groups))}
    assert rows["fiited_2d0.1"]["D_active"] == "9.0" and rows["full1"]["D_active"] == "n/a"
    assert report.METHOD_LABELS["fiited_2d"] == "FIITED-2D"
