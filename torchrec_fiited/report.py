"""Summarize training runs: a Markdown table and plots from every ``metrics.json`` found.

Usage::

    python -m torchrec_fiited.report multirun/2024-05-01 outputs/ --out results/

Every ``metrics.json`` under the given directories (Hydra multirun dirs nest them as
``multirun/<date>/<time>/<job_num>/metrics.json``) is one run. Runs are grouped by
``(dataset, emb, budget)`` and averaged over seeds. Written to ``--out`` (default: the first
directory):

* ``report.md``: one row per group, mean ± sample std (ddof=1; 0 for one seed) of test AUC,
  accuracy, log loss, NE, measured reduction ``embedding_bytes_full / embedding_bytes`` and
  examples/s, plus the AUC delta against the mean of the ``full`` runs of the same dataset and
  the mean ``D_active`` of FIITED runs (below D once FIITED-2D pruned dimensions); then, per
  method, its largest reduction within ``--tolerance`` AUC of ``full``;
* ``auc_vs_reduction.png`` and ``accuracy_vs_reduction.png`` (the FIITED paper's Fig. 8
  analogue), suffixed ``_<dataset>`` when there are several datasets;
* ``chunk_allocation_<emb>_b<budget>.png`` per run group that recorded ``chunk_allocation``
  (first seed; also prefixed ``<dataset>_`` when there are several datasets).

A malformed ``metrics.json`` is skipped with a warning naming the file and the problem.
"""

import argparse
import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

#: Keys every run's metrics.json must hold.
REQUIRED_KEYS = (
    "test_auc", "test_accuracy", "test_logloss", "test_ne", "embedding_bytes",
    "embedding_bytes_full", "budget", "emb", "dataset", "seed", "steps", "train_seconds",
    "examples_per_second",
)
NUMERIC_KEYS = (
    "test_auc", "test_accuracy", "test_logloss", "test_ne", "embedding_bytes",
    "embedding_bytes_full", "steps", "train_seconds", "examples_per_second",
)
#: Name of the unpruned baseline method, the reference of the AUC delta.
FULL = "full"
#: Axis labels of the plotted statistics.
LABELS = {"auc": "AUC", "accuracy": "accuracy"}
#: Legend names of the ``emb=`` methods (others show as they are).
METHOD_LABELS = {
    "full": "full", "fiited": "FIITED", "fiited_2d": "FIITED-2D", "fiited_dynamic": "FIITED (dynamic)",
    "adaembed": "AdaEmbed", "itep": "ITEP", "mixed_dim": "Mixed-Dim",
}
#: Default AUC tolerance against ``full`` of the "largest reduction" summary.
TOLERANCE = 0.002
#: Chunk-allocation figures show at most this many tables, the largest by rows.
MAX_TABLES = 8
#: Summary statistics (see :meth:`Run.value`) and the decimals they are shown with.
STATS = (("auc", 4), ("accuracy", 4), ("logloss", 4), ("ne", 4), ("mib", 2), ("reduction", 2),
         ("examples_per_second", 0))


@dataclass
class Run:
    """One training run, read from ``path``; ``metrics`` is the whole JSON object."""

    path: Path
    metrics: Dict[str, Any]

    @property
    def key(self) -> Tuple[str, str, Optional[float]]:
        m = self.metrics
        return str(m["dataset"]), str(m["emb"]), m["budget"]

    def value(self, stat: str) -> float:
        """A summary statistic of this run (``reduction`` is derived, the rest are read)."""
        m = self.metrics
        if stat == "reduction":
            return m["embedding_bytes_full"] / m["embedding_bytes"]
        if stat == "mib":
            return m["embedding_bytes"] / 2**20
        return float(m[stat] if stat == "examples_per_second" else m[f"test_{stat}"])

    def active_dim(self) -> Optional[float]:
        """Mean D_active over the tables of a FIITED run's final ``stats()``, else None."""
        tables = (self.metrics.get("fiited_stats") or {}).get("tables") or {}
        dims = [t["active_dim"] for t in tables.values() if isinstance(t, dict) and "active_dim" in t]
        return statistics.fmean(dims) if dims else None


@dataclass
class Group:
    """Runs of one (dataset, emb, budget), with mean and std per statistic of :data:`STATS`."""

    dataset: str
    emb: str
    budget: Optional[float]
    runs: List[Run]
    mean: Dict[str, float]
    std: Dict[str, float]
    auc_delta: Optional[float] = None
    active_dim: Optional[float] = None


def find_metrics(dirs: Sequence[Path]) -> List[Path]:
    """Every ``metrics.json`` under ``dirs``, recursively, sorted and without duplicates."""
    found = {p.resolve() for d in dirs for p in Path(d).rglob("metrics.json") if p.is_file()}
    return sorted(found)


def _problem(metrics: Any) -> Optional[str]:
    """Why ``metrics`` is not a usable run, or None when it is."""
    if not isinstance(metrics, dict):
        return f"expected a JSON object, got {type(metrics).__name__}"
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        return f"missing required keys {missing}"
    for k in NUMERIC_KEYS:
        v = metrics[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{k} must be a number, got {v!r}"
    budget = metrics["budget"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        return f"budget must be a number or null, got {budget!r}"
    if not metrics["embedding_bytes"] > 0:
        return f"embedding_bytes must be > 0, got {metrics['embedding_bytes']}"
    return None


def load_runs(paths: Sequence[Path]) -> List[Run]:
    """Parse each file; warn about and skip the ones that are not valid runs.

    Args:
        paths: ``metrics.json`` files.

    Returns:
        One :class:`Run` per valid file, in ``paths`` order.
    """
    runs = []
    for path in paths:
        try:
            metrics = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping {path}: unreadable or invalid JSON ({e})", stacklevel=2)
            continue
        if isinstance(metrics, dict) and "infeasible" in metrics:
            # A method that cannot reach the budget (Mixed-Dimension at tiny budgets): no point.
            print(f"note: {path}: {metrics.get('emb')} at budget {metrics.get('budget')} is "
                  f"infeasible: {metrics['infeasible']}")
            continue
        problem = _problem(metrics)
        if problem:
            warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
            continue
        runs.append(Run(Path(path), metrics))
    return runs


def _budget_order(budget: Optional[float]) -> float:
    """Sort key putting larger budgets first; a null budget (unpruned) counts as infinite."""
    return -math.inf if budget is None else -float(budget)


def summarize(runs: Sequence[Run]) -> List[Group]:
    """Group runs by (dataset, emb, budget) and average over seeds.

    Returns:
        Groups sorted by dataset, emb, then budget descending; ``auc_delta`` is the group's
        mean AUC minus the mean AUC of every ``full`` run of its dataset (None without one).
    """
    by_key: Dict[Tuple[str, str, Optional[float]], List[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    groups = []
    for (dataset, emb, budget), members in by_key.items():
        mean, std = {}, {}
        for stat, _ in STATS:
            values = [r.value(stat) for r in members]
            mean[stat] = statistics.fmean(values)
            std[stat] = statistics.stdev(values) if len(values) > 1 else 0.0
        dims = [d for d in (r.active_dim() for r in members) if d is not None]
        groups.append(Group(dataset, emb, budget, members, mean, std,
                            active_dim=statistics.fmean(dims) if dims else None))
    for g in groups:
        full = [r.value("auc") for r in runs if r.key[0] == g.dataset and r.key[1] == FULL]
        g.auc_delta = g.mean["auc"] - statistics.fmean(full) if full else None
    groups.sort(key=lambda g: (g.dataset, g.emb, _budget_order(g.budget)))
    return groups


def _budget_label(budget: Optional[float]) -> str:
    return "none" if budget is None else f"{budget:g}"


def _fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def markdown_table(groups: Sequence[Group]) -> str:
    """The summary as a Markdown table, one line per group (see module docstring)."""
    header = ["dataset", "emb", "budget", "seeds", "AUC", "ΔAUC vs full", "accuracy",
              "logloss", "NE", "embedding MiB", "reduction (x)", "D_active", "examples/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = {s: f"{_fmt(g.mean[s], d)} ± {_fmt(g.std[s], d)}" for s, d in STATS}
        delta = "n/a" if g.auc_delta is None else f"{g.auc_delta:+.4f}"
        budget = _budget_label(g.budget)
        row = [g.dataset, g.emb, budget, str(len(g.runs)), cells["auc"], delta,
               cells["accuracy"], cells["logloss"], cells["ne"], cells["mib"], cells["reduction"],
               "n/a" if g.active_dim is None else f"{g.active_dim:.1f}", cells["examples_per_second"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def best_within(groups: Sequence[Group], tolerance: float) -> List[Group]:
    """Per (dataset, method other than ``full``), the group with the largest mean reduction whose
    mean AUC is at most ``tolerance`` below ``full``'s; methods with none are left out."""
    best: Dict[Tuple[str, str], Group] = {}
    for g in groups:
        if g.emb == FULL or g.auc_delta is None or g.auc_delta < -tolerance:
            continue
        key = (g.dataset, g.emb)
        if key not in best or g.mean["reduction"] > best[key].mean["reduction"]:
            best[key] = g
    return [best[k] for k in sorted(best)]


def best_lines(groups: Sequence[Group], tolerance: float) -> str:
    """:func:`best_within` as a Markdown list, one line per method."""
    lines = []
    for g in best_within(groups, tolerance):
        dims = "" if g.active_dim is None else f", D_active {g.active_dim:.1f}"
        lines.append(f"- {g.dataset} {g.emb}: budget {_budget_label(g.budget)}, ΔAUC "
                     f"{g.auc_delta:+.4f}, reduction {_fmt(g.mean['reduction'], 2)} ± "
                     f"{_fmt(g.std['reduction'], 2)}x{dims}")
    return "\n".join(lines or ["- none"]) + "\n"


def _safe(name: str) -> str:
    """``name`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg draws without a display and without pyplot's global state
    fig.savefig(path, dpi=120)
    return path


def _format_reduction_axis(ax, reductions: List[float]) -> None:
    """Log x axis labelled "4x" rather than "4 x 10^0"; minor ticks get labels only when the
    data span less than a decade (more would crowd the axis)."""
    ax.set_xscale("log")
    times = FuncFormatter(lambda x, _: f"{x:g}x")
    ax.xaxis.set_major_formatter(times)
    narrow = max(reductions) < 10 * min(reductions)
    ax.xaxis.set_minor_formatter(times if narrow else NullFormatter())


def plot_metric_vs_reduction(groups: Sequence[Group], stat: str, out_dir: Path) -> List[Path]:
    """Test ``stat`` (``auc`` or ``accuracy``) against the embedding-size reduction.

    One PNG per dataset: a line with std error bars per method over its budgets, the
    ``full`` method's mean as a horizontal line. Named ``<stat>_vs_reduction.png``, with a
    ``_<dataset>`` suffix when there are several datasets.

    Returns:
        The paths written.
    """
    datasets = sorted({g.dataset for g in groups})
    written = []
    for dataset in datasets:
        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.add_subplot()
        mine = [g for g in groups if g.dataset == dataset]
        for emb in sorted({g.emb for g in mine}):
            points = sorted((g for g in mine if g.emb == emb), key=lambda g: g.mean["reduction"])
            if emb == FULL:
                ax.axhline(statistics.fmean(g.mean[stat] for g in points), color="black",
                           linestyle="--", label=FULL)
                continue
            ax.errorbar([g.mean["reduction"] for g in points], [g.mean[stat] for g in points],
                        yerr=[g.std[stat] for g in points], marker="o", capsize=3,
                        label=METHOD_LABELS.get(emb, emb))
        _format_reduction_axis(ax, [g.mean["reduction"] for g in mine])
        label = LABELS.get(stat, stat)
        ax.set_xlabel("embedding-size reduction (full bytes / bytes, log scale)")
        ax.set_ylabel(f"test {label}")
        ax.set_title(f"{dataset}: test {label} vs embedding reduction")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        suffix = f"_{_safe(dataset)}" if len(datasets) > 1 else ""
        written.append(_save(fig, out_dir / f"{stat}_vs_reduction{suffix}.png"))
    return written


def _allocation_series(run: Run) -> Dict[str, Tuple[List[int], List[List[int]]]]:
    """``chunk_allocation`` of ``run`` as table -> (steps, per-step rows by live count).

    Raises:
        ValueError: naming the run's file when the snapshots are not as documented.
    """
    series: Dict[str, Tuple[List[int], List[List[int]]]] = {}
    for i, snap in enumerate(run.metrics["chunk_allocation"]):
        tables = snap.get("tables") if isinstance(snap, dict) else None
        if not isinstance(tables, dict) or not isinstance(snap.get("step"), int):
            raise ValueError(f"{run.path}: chunk_allocation[{i}] needs an int 'step' and a "
                             f"'tables' object, got {snap!r:.200}")
        for name, counts in tables.items():
            if not isinstance(counts, list) or not all(isinstance(c, int) for c in counts):
                raise ValueError(f"{run.path}: chunk_allocation[{i}] table {name} must be a "
                                 f"list of row counts, got {counts!r:.200}")
            steps, rows = series.setdefault(name, ([], []))
            steps.append(snap["step"])
            rows.append(counts)
    return series


def _padded(rows: List[List[int]], width: int) -> List[List[int]]:
    return [r + [0] * (width - len(r)) for r in rows]


def _draw_last_snapshot(ax, names: List[str], last: Dict[str, List[int]], colors) -> None:
    """Stacked bars: rows of each table at the last snapshot, by number of live chunks."""
    bottoms = [0] * len(names)
    for k, color in enumerate(colors):
        heights = [last[n][k] for n in names]
        ax.bar(names, heights, bottom=bottoms, color=color, label=f"{k} live")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("rows (last snapshot)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7, ncols=min(len(colors), 5))


def _draw_over_training(ax, name: str, steps: List[int], rows: List[List[int]], colors) -> None:
    """Lines: fraction of the table's seen rows with each live-chunk count, by step."""
    totals = [sum(r) for r in rows]
    for k, color in enumerate(colors):
        ax.plot(steps, [r[k] / t if t else 0.0 for r, t in zip(rows, totals)], color=color)
    ax.set_title(name, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=7)


def plot_chunk_allocation(run: Run, path: Path) -> Optional[Path]:
    """Rows by live-chunk count for the ``MAX_TABLES`` largest tables of ``run``.

    Top: stacked bars at the last snapshot; below, one small plot per table with the
    fraction of rows at each live count over training.

    Returns:
        ``path``, or None when the run recorded no snapshots.

    Raises:
        ValueError: when ``chunk_allocation`` is malformed (see :func:`_allocation_series`).
    """
    series = _allocation_series(run)
    if not series:
        return None
    width = max(len(r) for _, rows in series.values() for r in rows)
    series = {n: (s, _padded(rows, width)) for n, (s, rows) in series.items()}
    last = {n: rows[-1] for n, (_, rows) in series.items()}
    names = sorted(series, key=lambda n: (-sum(last[n]), n))[:MAX_TABLES]
    ncols = min(len(names), 4)
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.2 * ncols + 1, 3.2 + 2.4 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols)
    colors = [colormaps["viridis"](k / max(width - 1, 1)) for k in range(width)]
    _draw_last_snapshot(fig.add_subplot(grid[0, :]), names, last, colors)
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        _draw_over_training(ax, name, *series[name], colors)
        if i % ncols == 0:
            ax.set_ylabel("fraction of rows")
        if i // ncols == nrows - 1:
            ax.set_xlabel("step")
    m = run.metrics
    fig.suptitle(f"{m['dataset']} {m['emb']} budget {m['budget']} seed {m['seed']}: "
                 f"rows by live chunks")
    return _save(fig, path)


def plot_allocations(groups: Sequence[Group], out_dir: Path) -> List[Path]:
    """One chunk-allocation figure per group with snapshots, from its lowest seed.

    Returns:
        The paths written; malformed snapshots are skipped with a warning naming the file.
    """
    several = len({g.dataset for g in groups}) > 1
    written = []
    for g in groups:
        recorded = [r for r in g.runs if r.metrics.get("chunk_allocation")]
        if not recorded:
            continue
        run = min(recorded, key=lambda r: str(r.metrics["seed"]))
        prefix = f"{_safe(g.dataset)}_" if several else ""
        name = f"chunk_allocation_{prefix}{_safe(g.emb)}_b{_budget_label(g.budget)}.png"
        try:
            path = plot_chunk_allocation(run, out_dir / name)
        except ValueError as e:
            warnings.warn(f"skipping chunk allocation plot: {e}", stacklevel=2)
            continue
        if path is not None:
            written.append(path)
    return written


def write_report(runs: Sequence[Run], out_dir: Path, sources: Sequence[Path],
                 tolerance: float = TOLERANCE) -> List[Path]:
    """Write ``report.md`` and every plot into ``out_dir`` (created if needed).

    Returns:
        The paths written, ``report.md`` first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = summarize(runs)
    plots = plot_metric_vs_reduction(groups, "auc", out_dir)
    plots += plot_metric_vs_reduction(groups, "accuracy", out_dir)
    plots += plot_allocations(groups, out_dir)
    text = [
        "# Results\n",
        f"{len(runs)} runs from {', '.join(str(s) for s in sources)}. Mean ± sample std over "
        "seeds; reduction = embedding_bytes_full / embedding_bytes; ΔAUC = mean AUC minus the "
        f"mean AUC of the `{FULL}` runs of the same dataset.\n",
        markdown_table(groups),
        f"Largest mean reduction per method with mean AUC at most {tolerance:g} below `{FULL}`:\n",
        best_lines(groups, tolerance),
        *[f"![{p.stem}]({p.name})\n" for p in plots],
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return [report, *plots]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI entry point: ``python -m torchrec_fiited.report DIR... [--out OUTDIR]``."""
    parser = argparse.ArgumentParser(prog="python -m torchrec_fiited.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories searched for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: first DIR)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"AUC below full still counted as no loss (default {TOLERANCE})")
    args = parser.parse_args(argv)
    paths = find_metrics(args.dirs)
    if not paths:
        parser.error(f"no metrics.json found under {', '.join(str(d) for d in args.dirs)}")
    runs = load_runs(paths)
    if not runs:
        parser.error(f"none of the {len(paths)} metrics.json files found is valid (see warnings)")
    print(markdown_table(summarize(runs)))
    print(best_lines(summarize(runs), args.tolerance))
    for path in write_report(runs, args.out or args.dirs[0], args.dirs, args.tolerance):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
