"""The report tool: table values by hand, the headline, paired deltas, milestones, infeasible
points, plots, malformed inputs and the CLI."""

import json
import re
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
    """The first Markdown table in ``md`` as dicts (cells split on unescaped ``|``)."""
    lines = md[md.index("| "):].split("\n\n")[0].splitlines()
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in lines if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in r))) for r in rows[1:]]


def _section(md: str, title: str) -> str:
    """The text of the ``## title...`` section of a report."""
    return md.split(f"## {title}")[1].split("\n## ")[0]


def test_table_values_by_hand(run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        report.main([str(run_dir), "--out", str(out)])
    rows = _table_rows(_section((out / "report.md").read_text(), "All groups"))
    assert [(r["emb"], r["budget"]) for r in rows] == [
        ("fiited", "0.5"), ("fiited", "0.1"), ("full", "1"), ("mixed_dim", "0.5")]
    fiited = rows[0]
    assert fiited["seeds"] == "2"
    assert fiited["AUC"] == f"0.8070 ± {statistics.stdev([0.805, 0.809]):.4f}"
    # Paired per seed: 0.805 - 0.80, 0.809 - 0.82.
    assert fiited["AUC delta ± std"] == f"-0.0030 ± {statistics.stdev([0.005, -0.011]):.4f}"
    assert fiited["paired"] == "on seed"
    assert fiited["reduction (x)"] == f"4.50 ± {statistics.stdev([5.0, 4.0]):.2f}"  # 1000/200, 1000/250
    assert fiited["examples/s"] == f"1,100 ± {statistics.stdev([1000, 1200]):,.0f}"
    assert rows[1]["AUC delta ± std"] == f"-0.0150 ± {statistics.stdev([-0.01, -0.02]):.4f}"
    assert rows[2]["AUC delta ± std"] == "+0.0000 ± 0.0000"
    assert rows[2]["accuracy"] == f"0.7100 ± {statistics.stdev([0.70, 0.72]):.4f}"
    assert rows[3]["AUC"] == "0.7800 ± 0.0000" and rows[3]["reduction (x)"] == "2.50 ± 0.00"
    # Seed 0 only: paired against full's seed 0 (0.80), not full's mean (0.81, which gives -0.03).
    assert rows[3]["AUC delta ± std"] == "-0.0200 ± 0.0000"
    messages = [str(w.message) for w in caught]
    assert any("90" in m and "metrics.json" in m and "invalid JSON" in m for m in messages)
    assert any("91" in m and "missing required keys ['test_ne']" in m for m in messages)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > len(PNG_MAGIC) and path.read_bytes()[:8] == PNG_MAGIC


def test_plots_are_valid_pngs(run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        report.main([str(run_dir), "--out", str(out)])
    expected = ["auc_vs_reduction.png", "accuracy_vs_reduction.png", "auc_delta_vs_reduction.png",
                "chunk_allocation_fiited_b0.5.png", "chunk_allocation_fiited_b0.1.png"]
    for name in expected:
        assert _is_png(out / name), name
        assert f"]({name})" in (out / "report.md").read_text()
    # mixed_dim recorded no snapshots, and full none at all.
    assert sorted(p.name for p in out.glob("chunk_allocation_*")) == sorted(expected[3:])


def test_out_defaults_to_first_dir_and_datasets_get_suffixes(tmp_path):
    for i, m in enumerate(RUNS[:3]):
        _write(tmp_path, i, m)
    _write(tmp_path, 10, _metrics("full", 1.0, 0, 0.7, dataset="avazu"))
    _write(tmp_path, 11, _metrics("fiited", 0.5, 0, 0.69, bytes_=300, dataset="avazu",
                                  chunk_allocation=_allocation(tables=[f"t{i}" for i in range(12)], k=1)))
    report.main([str(tmp_path)])
    for name in ["auc_vs_reduction_criteo.png", "auc_vs_reduction_avazu.png",
                 "accuracy_vs_reduction_avazu.png", "auc_delta_vs_reduction_avazu.png",
                 "auc_delta_vs_reduction_criteo.png", "chunk_allocation_avazu_fiited_b0.5.png",
                 "chunk_allocation_criteo_fiited_b0.5.png", "report.md"]:
        assert (tmp_path / name).stat().st_size > 0, name
    rows = _table_rows(_section((tmp_path / "report.md").read_text(), "All groups"))
    assert [r["dataset"] for r in rows] == ["avazu", "avazu", "criteo", "criteo"]
    assert rows[0]["AUC delta ± std"] == "-0.0100 ± 0.0000"  # avazu's own full run, not criteo's


def test_missing_full_gives_na_and_bad_allocation_warns(tmp_path):
    bad = _metrics("fiited", 0.5, 0, 0.8, bytes_=500, chunk_allocation=[{"step": "x"}])
    _write(tmp_path, 0, bad)
    with pytest.warns(UserWarning, match=r"metrics\.json: chunk_allocation\[0\] needs an int 'step'"):
        report.main([str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert _table_rows(_section(md, "All groups"))[0]["AUC delta ± std"] == "n/a"
    assert not (tmp_path / "auc_delta_vs_reduction.png").exists()
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


def test_largest_reduction_within_tolerance_active_dims_and_order(tmp_path):
    dims = {"tables": {"a": {"active_dim": 8}, "b": {"active_dim": 10}}}
    runs = [_metrics("full", 1.0, 0, 0.800), _metrics("fiited", 0.5, 0, 0.799, bytes_=500),
            _metrics("fiited", 0.1, 0, 0.797, bytes_=200),  # 0.003 below full: too far
            _metrics("fiited_2d", 0.1, 0, 0.7985, bytes_=150, fiited_stats=dims),
            # Budget and reduction disagree: the table follows the reduction.
            _metrics("fiited_dynamic", 0.5, 0, 0.80, bytes_=300),
            _metrics("fiited_dynamic", 0.25, 0, 0.80, bytes_=400)]
    for i, m in enumerate(runs):
        _write(tmp_path, i, m)
    groups = report.summarize(report.load_results(report.find_metrics([tmp_path])).runs)
    best = report.best_within(groups, 0.002)
    assert {k: g.budget for k, g in best.items()} == {
        ("criteo", "fiited"): 0.5, ("criteo", "fiited_2d"): 0.1, ("criteo", "fiited_dynamic"): 0.5}
    rows = _table_rows(report.markdown_table(groups))
    assert [(r["emb"], r["budget"]) for r in rows] == [
        ("fiited", "0.5"), ("fiited", "0.1"), ("fiited_2d", "0.1"), ("fiited_dynamic", "0.25"),
        ("fiited_dynamic", "0.5"), ("full", "1")]
    by = {r["emb"] + r["budget"]: r for r in rows}
    assert by["fiited_2d0.1"]["D_active"] == "9.0" and by["full1"]["D_active"] == "n/a"
    assert report.METHOD_LABELS["fiited_2d"] == "FIITED-2D"
    assert (report.METHOD_LABELS["hash"], report.METHOD_LABELS["qr"], report.METHOD_LABELS["freq_oracle"]) == (
        "Hashing", "QR (compositional)", "Freq. oracle (calibration)")


def _groups(metrics):
    """Groups from metrics dicts, without files."""
    return report.summarize([report.Run(Path(f"m{i}.json"), m) for i, m in enumerate(metrics)])


def _two_seeds(emb, budget, reduction, delta, full=(0.800, 0.802), noise=(-0.0003, 0.0003)):
    """Seeds 0 and 1 of one group: AUC = full's AUC of the seed + delta + noise."""
    return [_metrics(emb, budget, s, f + delta + n, bytes_=FULL_BYTES / reduction)
            for s, (f, n) in enumerate(zip(full, noise))]


HEADLINE_RUNS = [
    _metrics("full", 1.0, 0, 0.800), _metrics("full", 1.0, 1, 0.802),  # mean 0.801
    *_two_seeds("hash", 0.5, 2.0, -0.0005),
    *_two_seeds("hash", 0.1, 10.0, -0.001),  # exactly on the 0.001 line: qualifies
    *_two_seeds("hash", 0.02, 50.0, -0.004),
    *_two_seeds("hash", 0.005, 200.0, -0.006),  # outside both
    *_two_seeds("qr", 0.2, 5.0, +0.0005),
    *_two_seeds("qr", 0.05, 20.0, -0.002),
    *_two_seeds("qr", 0.01, 100.0, -0.0049),
    *_two_seeds("freq_oracle", 0.3, 3.0, -0.002),
    *_two_seeds("freq_oracle", 0.15, 6.0, -0.0015),  # never within 0.001
]


def test_headline_picks_largest_reduction_within_each_tolerance():
    groups = _groups(HEADLINE_RUNS)
    picks = {tol: {k[1]: None if g is None else g.mean["reduction"]
                   for k, g in report.best_within(groups, tol).items()} for tol in (0.001, 0.005)}
    assert picks[0.001] == {"hash": pytest.approx(10.0), "qr": pytest.approx(5.0), "freq_oracle": None}
    assert picks[0.005] == {"hash": pytest.approx(50.0), "qr": pytest.approx(100.0),
                            "freq_oracle": pytest.approx(6.0)}
    rows = _table_rows(report.headline_table(groups, (0.001, 0.005)))
    assert [(r["method"], r["within"], r["budget"]) for r in rows] == [
        ("Freq. oracle (calibration)", "0.001", "-"), ("Freq. oracle (calibration)", "0.005", "0.15"),
        ("Hashing", "0.001", "0.1"), ("Hashing", "0.005", "0.02"),
        ("QR (compositional)", "0.001", "0.2"), ("QR (compositional)", "0.005", "0.01")]
    assert rows[0]["reduction (x)"] == "no point within"
    hash_50 = rows[3]
    aucs = [0.800 - 0.004 - 0.0003, 0.802 - 0.004 + 0.0003]
    assert hash_50["reduction (x)"] == "50.00 ± 0.00" and hash_50["seeds"] == "2"
    assert hash_50["ΔAUC ± AUC std"] == f"-0.0040 ± {statistics.stdev(aucs):.4f}"  # std 0.0018
    # Paired: per-seed deltas -0.0043 and -0.0037.
    assert hash_50["paired ΔAUC ± std"] == f"-0.0040 ± {statistics.stdev([-0.0043, -0.0037]):.4f} (n=2)"
    assert "- criteo: `full` AUC 0.8010 ± 0.0014 over 2 runs" in report.full_lines(
        [report.Run(Path("f"), m) for m in HEADLINE_RUNS])


def test_headline_without_full_says_so():
    rows = _table_rows(report.headline_table(_groups(_two_seeds("hash", 0.1, 10.0, 0.0)), (0.001,)))
    assert rows == [{"dataset": "criteo", "method": "Hashing", "within": "0.001", "budget": "-",
                     "seeds": "-", "reduction (x)": "no `full` runs", "ΔAUC ± AUC std": "-",
                     "paired ΔAUC ± std": "-"}]


def test_paired_deltas_by_hand():
    full = [_metrics("full", 1.0, s, auc, dataset_seed=7) for s, auc in enumerate([0.80, 0.81, 0.79])]
    same = [_metrics("a", 0.1, s, auc, dataset_seed=7) for s, auc in enumerate([0.801, 0.808, 0.791])]
    other_seed = [_metrics("b", 0.1, s, auc, dataset_seed=7) for s, auc in [(0, 0.801), (1, 0.808), (5, 0.791)]]
    other_data = [_metrics("c", 0.1, s, auc, dataset_seed=8) for s, auc in enumerate([0.801, 0.808, 0.791])]
    groups = {g.emb: g for g in _groups(full + same + other_seed + other_data)}
    a = groups["a"].delta  # per-seed deltas +0.001, -0.002, +0.001
    assert a.paired and a.on == "seed, dataset_seed" and a.n == 3
    assert a.mean == pytest.approx(0.0, abs=1e-12)
    assert a.std == pytest.approx(statistics.stdev([0.001, -0.002, 0.001]))  # 0.0017, not the AUC's 0.0085
    for name in "bc":  # seed 5 has no full partner; dataset_seed 8 is other data
        d = groups[name].delta
        assert not d.paired and d.mean == pytest.approx(0.0, abs=1e-12)
        assert d.std == pytest.approx(statistics.stdev([0.801, 0.808, 0.791]))
    rows = {r["emb"]: r for r in _table_rows(report.markdown_table(list(groups.values())))}
    assert rows["a"]["AUC delta ± std"] == "+0.0000 ± 0.0017" and rows["a"]["paired"] == "on seed, dataset_seed"
    assert rows["b"]["AUC delta ± std"] == "+0.0000 ± 0.0085" and rows["b"]["paired"] == "no"
    # Without dataset_seed in the metrics, pairing is on seed alone.
    plain = _groups([_metrics("full", 1.0, 0, 0.80), _metrics("a", 0.1, 0, 0.79)])
    assert plain[0].delta.on == "seed" and plain[0].delta.mean == pytest.approx(-0.01)


def test_infeasible_points_are_reported(tmp_path):
    for i, m in enumerate(RUNS):
        _write(tmp_path, i, m)
    reason = "mixed_dim: dim 4 plus the projection already takes 0.3 of the full bytes"
    for seed in (0, 1):
        _write(tmp_path, 20 + seed, {"emb": "mixed_dim", "budget": 0.1, "seed": seed,
                                     "dataset": "criteo", "infeasible": reason})
    _write(tmp_path, 30, {"emb": "qr", "budget": 0.001, "seed": 0, "dataset": "criteo",
                          "infeasible": "no | such size"})
    _write(tmp_path, 31, {"budget": 0.1, "seed": 0, "dataset": "criteo", "infeasible": "x"})
    with pytest.warns(UserWarning, match=r"31/metrics\.json: infeasible record missing required keys \['emb'\]"):
        results = report.load_results(report.find_metrics([tmp_path]))
    assert len(results.runs) == len(RUNS) and len(results.infeasible) == 3
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        report.main([str(tmp_path), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert _table_rows(_section(md, "Infeasible points")) == [
        {"dataset": "criteo", "method": "Mixed-Dim", "budget": "0.1", "seeds": "0, 1", "reason": reason},
        {"dataset": "criteo", "method": "QR (compositional)", "budget": "0.001", "seeds": "0",
         "reason": "no \\| such size"}]
    assert "7 runs and 3 infeasible points" in md
    headline = _table_rows(_section(md, "Largest measured reduction"))
    assert {(r["method"], r["reduction (x)"]) for r in headline if r["method"].startswith("QR")} == {
        ("QR (compositional)", "infeasible only")}


def test_only_infeasible_is_an_error(tmp_path, capsys):
    _write(tmp_path, 0, {"emb": "qr", "budget": 0.1, "seed": 0, "dataset": "d", "infeasible": "x"})
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "is valid (1 infeasible points, no runs" in capsys.readouterr().err


def test_nearest_point_at_milestones():
    reductions = {0.5: 8.2, 0.4: 11.9, 0.1: 130.0, 0.05: 700.0}
    groups = _groups([_metrics("full", 1.0, 0, 0.80)] + [
        _metrics("hash", b, 0, 0.79, bytes_=FULL_BYTES / r) for b, r in reductions.items()])
    mine = [g for g in groups if g.emb == "hash"]
    g, why = report.nearest_point(mine, 10.0)
    assert why == "" and g.budget == 0.4  # 11.9 is nearer 10 in ratio (1.19 vs 1.22), not in difference
    assert report.nearest_point(mine, 100.0) == (None, "no point within 1.25x")  # 130 > 125
    assert report.nearest_point(mine, 1000.0) == (None, "not reached")  # 700 < 800
    assert report.nearest_point(mine, 1000.0, factor=1.5)[0].budget == 0.05
    exact = _groups([_metrics("hash", 0.2, 0, 0.79, bytes_=FULL_BYTES / 8.0)])
    assert report.nearest_point(exact, 10.0)[0] is not None  # 8.0 = 10 / 1.25 counts
    rows = _table_rows(report.milestone_table(groups))
    assert rows == [{"dataset": "criteo", "method": "Hashing",
                     "10x": "-0.0100 ± 0.0000 (11.9x, budget 0.4)",
                     "100x": "no point within 1.25x", "1000x": "not reached"}]


def test_figures_have_log_reduction_axis_band_and_tolerance_lines():
    groups = _groups(HEADLINE_RUNS)
    fig = report.reduction_figure(groups, "criteo", "auc")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.xaxis.get_majorticklocs()) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    lo, hi = ax.get_xlim()
    assert lo < 1 and hi > 1000
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["full (mean ± std, 2 runs)", "Freq. oracle (calibration)", "Hashing",
                      "QR (compositional)"]
    band, full_std = handles[0], statistics.stdev([0.8, 0.802])  # the axhspan: full's mean ± std
    assert band.get_y() == pytest.approx(0.801 - full_std)
    assert band.get_y() + band.get_height() == pytest.approx(0.801 + full_std)
    assert len(ax.containers) == 3  # one errorbar per method, full excluded
    delta = report.delta_figure(groups, "criteo", (0.001, 0.005)).axes[0]
    assert delta.get_xscale() == "log"
    flat = {round(line.get_ydata()[0], 6) for line in delta.lines
            if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2}
    assert {0.0, -0.001, -0.005} <= flat
    assert report.reduction_ticks([0.63, 1100.0]) == [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_tolerances_option(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        report.main([str(run_dir), "--out", str(out), "--tolerances", "0.002,0.02"])
    headline = _table_rows(_section((out / "report.md").read_text(), "Largest"))
    assert [(r["method"], r["within"], r["budget"]) for r in headline] == [
        ("FIITED", "0.002", "-"), ("FIITED", "0.02", "0.1"),
        ("Mixed-Dim", "0.002", "-"), ("Mixed-Dim", "0.02", "-")]  # mixed_dim: -0.03
    with pytest.raises(SystemExit):
        report.main([str(run_dir), "--tolerances", "0.001,abc"])
    assert "tolerances must be comma-separated AUC differences >= 0" in capsys.readouterr().err
    assert report.parse_tolerances("0.001,0.005") == (0.001, 0.005) == report.TOLERANCES


def test_terminal_output_is_one_table_and_where_the_report_is(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        report.main([str(run_dir), "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| dataset | emb | budget | seeds | AUC | AUC delta ± std |")
    assert len(lines) == 2 + 4 + 1  # header, rule, 4 groups, where the files went
    assert lines[-1] == f"wrote {out / 'report.md'} and 5 plots in {out}"
    assert "| fiited | 0.5 | 2 | 0.8070 ± " in lines[2]
