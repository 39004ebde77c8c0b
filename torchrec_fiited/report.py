"""Summarize training runs: Markdown tables and plots from every ``metrics.json`` found.

Usage::

    python -m torchrec_fiited.report multirun/2024-05-01 outputs/ --out results/ \
        --tolerances 0.001,0.005

Every ``metrics.json`` under the given directories (Hydra multirun dirs nest them as
``multirun/<date>/<time>/<job_num>/metrics.json``) is one run. Runs are grouped by
``(dataset, emb, budget)`` and averaged over seeds; reduction is the *measured*
``embedding_bytes_full / embedding_bytes``. Written to ``--out`` (default: the first directory),
``report.md`` with, in order:

* the headline: per method and tolerance (``--tolerances``, default 0.001 and 0.005), the
  group with the largest mean reduction whose mean AUC is at least ``full``'s mean AUC minus
  the tolerance, with its reduction mean ± std and ΔAUC mean ± the group's AUC std over seeds
  (``full``'s own seed std is stated beside it), and the paired ΔAUC (below);
* ΔAUC at 10x, 100x and 1000x: per method the measured point nearest each target, if one lies
  within a factor :data:`MILESTONE_FACTOR` of it;
* the infeasible points: runs that wrote ``{"infeasible": reason}`` (a budget the method
  cannot reach), listed with their reason;
* one row per group, sorted by dataset, method, then reduction: mean ± sample std (ddof=1; 0
  for one seed) of test AUC, accuracy, log loss, NE, MiB, reduction and examples/s, the mean
  ``D_active`` of FIITED runs, and "AUC delta ± std". That delta is *paired* when every run of
  the group has a ``full`` run of the same dataset with the same ``seed`` (and the same
  ``dataset_seed``, when the runs record one): the mean ± std of the per-seed differences.
  Otherwise it is unpaired: mean AUC minus ``full``'s mean AUC, ± the group's AUC std;

and the plots (suffixed ``_<dataset>`` when there are several datasets):

* ``auc_vs_reduction.png`` and ``accuracy_vs_reduction.png`` (the FIITED paper's Fig. 8
  analogue): a line per method with seed-std error bars on a log reduction axis spanning at least
  1x to 1000x, ``full`` as a band of mean ± std;
* ``auc_delta_vs_reduction.png``: the table's AUC delta, with lines at minus each tolerance;
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
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

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
#: Keys an infeasible point's metrics.json must hold (besides ``infeasible``, the reason).
INFEASIBLE_KEYS = ("emb", "budget", "dataset")
#: Name of the unpruned baseline method, the reference of the AUC delta.
FULL = "full"
#: Optional metrics key of the data's own seed (``dataset.seed``); runs are paired on it too when
#: recorded. ``seed`` alone sets model init and shuffling, not the data.
DATASET_SEED = "dataset_seed"
#: Axis labels of the plotted statistics.
LABELS = {"auc": "AUC", "accuracy": "accuracy"}
#: Legend names of the ``emb=`` methods (others show as they are).
METHOD_LABELS = {
    "full": "full", "fiited": "FIITED", "fiited_2d": "FIITED-2D", "fiited_dynamic": "FIITED (dynamic)",
    "adaembed": "AdaEmbed", "itep": "ITEP", "mixed_dim": "Mixed-Dim", "hash": "Hashing",
    "qr": "QR (compositional)", "freq_oracle": "Freq. oracle (calibration)",
}
#: Default AUC tolerances against ``full`` of the headline ("largest reduction within").
TOLERANCES = (0.001, 0.005)
#: Slack on the tolerance test, so that a delta of exactly -tolerance qualifies despite float
#: rounding (0.8 - 0.799 is 0.0010000000000000009).
_EPS = 1e-12
#: Reductions at which :func:`milestone_table` reports each method's AUC delta.
MILESTONES = (10.0, 100.0, 1000.0)
#: A measured point counts for a milestone when within this factor of it (either side).
MILESTONE_FACTOR = 1.25
#: The reduction axis spans at least this range (and more when the data do).
AXIS_SPAN = (1.0, 1000.0)
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

    @property
    def pair_key(self) -> Tuple[str, Optional[str]]:
        """What a paired comparison matches on: ``seed`` and, when recorded, ``dataset_seed``."""
        data_seed = self.metrics.get(DATASET_SEED)
        return str(self.metrics["seed"]), None if data_seed is None else str(data_seed)

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
class Infeasible:
    """A run that could not reach its budget, read from ``path``; ``reason`` is why."""

    path: Path
    dataset: str
    emb: str
    budget: Optional[float]
    seed: Any
    reason: str


@dataclass
class Delta:
    """AUC difference of a group against ``full``: ``mean`` ± ``std`` over ``n`` seeds.

    ``paired`` is True when it is the mean and std of per-seed differences against the ``full``
    run of the same seed (``on`` names the keys matched); else mean AUC minus ``full``'s mean
    AUC, ± the group's own AUC std.
    """

    mean: float
    std: float
    n: int
    paired: bool
    on: str = ""

    def cell(self) -> str:
        """``"+0.0012 ± 0.0004"``, as the tables show it."""
        return f"{self.mean:+.4f} ± {self.std:.4f}"


@dataclass
class FullRef:
    """The ``full`` runs of one dataset: mean and std of their AUC, and the AUC per pair key."""

    mean: float
    std: float
    n: int
    by_pair: Dict[Tuple[str, Optional[str]], float]


@dataclass
class Group:
    """Runs of one (dataset, emb, budget), with mean and std per statistic of :data:`STATS`.

    ``auc_delta`` is the mean AUC minus ``full``'s mean AUC (the headline's test); ``delta`` is
    the table's AUC delta, paired when seeds match (see :class:`Delta`). Both None without
    ``full`` runs of the dataset.
    """

    dataset: str
    emb: str
    budget: Optional[float]
    runs: List[Run]
    mean: Dict[str, float]
    std: Dict[str, float]
    auc_delta: Optional[float] = None
    delta: Optional[Delta] = None
    active_dim: Optional[float] = None


@dataclass
class Results:
    """What :func:`load_results` read: the runs and the infeasible points."""

    runs: List[Run]
    infeasible: List[Infeasible]


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
    return _budget_problem(metrics["budget"]) or (
        None if metrics["embedding_bytes"] > 0
        else f"embedding_bytes must be > 0, got {metrics['embedding_bytes']}")


def _budget_problem(budget: Any) -> Optional[str]:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        return f"budget must be a number or null, got {budget!r}"
    return None


def _infeasible_problem(metrics: Dict[str, Any]) -> Optional[str]:
    """Why an ``infeasible`` record is unusable, or None when it is."""
    missing = [k for k in INFEASIBLE_KEYS if k not in metrics]
    if missing:
        return f"infeasible record missing required keys {missing}"
    return _budget_problem(metrics["budget"])


def load_results(paths: Sequence[Path]) -> Results:
    """Parse each file; warn about and skip the ones that are neither a run nor infeasible.

    Args:
        paths: ``metrics.json`` files.

    Returns:
        One :class:`Run` per valid file and one :class:`Infeasible` per valid infeasible
        record (``{"emb", "budget", "seed", "dataset", "infeasible": reason}``), in ``paths``
        order.
    """
    runs, infeasible = [], []
    for path in paths:
        try:
            metrics = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping {path}: unreadable or invalid JSON ({e})", stacklevel=2)
            continue
        if isinstance(metrics, dict) and "infeasible" in metrics:
            problem = _infeasible_problem(metrics)
            if problem is None:
                infeasible.append(Infeasible(
                    Path(path), str(metrics["dataset"]), str(metrics["emb"]), metrics["budget"],
                    metrics.get("seed"), str(metrics["infeasible"])))
        else:
            problem = _problem(metrics)
            if problem is None:
                runs.append(Run(Path(path), metrics))
        if problem:
            warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
    return Results(runs, infeasible)


def _std(values: Sequence[float]) -> float:
    """Sample std (ddof=1), 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def full_refs(runs: Sequence[Run]) -> Dict[str, FullRef]:
    """Per dataset, the AUC of its ``full`` runs (every budget): mean, std and per pair key
    (the mean when several ``full`` runs share one)."""
    aucs: Dict[str, Dict[Tuple[str, Optional[str]], List[float]]] = {}
    for r in runs:
        if r.key[1] == FULL:
            aucs.setdefault(r.key[0], {}).setdefault(r.pair_key, []).append(r.value("auc"))
    refs = {}
    for dataset, by_pair in aucs.items():
        values = [a for v in by_pair.values() for a in v]
        refs[dataset] = FullRef(statistics.fmean(values), _std(values), len(values),
                                {k: statistics.fmean(v) for k, v in by_pair.items()})
    return refs


def auc_delta(runs: Sequence[Run], ref: FullRef) -> Delta:
    """AUC delta of ``runs`` (one group) against ``ref``, paired when every run has a ``full``
    partner with the same :attr:`Run.pair_key`, else unpaired (see :class:`Delta`)."""
    aucs = [r.value("auc") for r in runs]
    keys = [r.pair_key for r in runs]
    if all(k in ref.by_pair for k in keys):
        diffs = [a - ref.by_pair[k] for a, k in zip(aucs, keys)]
        on = "seed, dataset_seed" if any(k[1] is not None for k in keys) else "seed"
        return Delta(statistics.fmean(diffs), _std(diffs), len(diffs), True, on)
    return Delta(statistics.fmean(aucs) - ref.mean, _std(aucs), len(aucs), False)


def _reduction_order(g: Group) -> Tuple:
    """Sort key: dataset, method, then mean reduction ascending (budget descending on ties)."""
    budget = -math.inf if g.budget is None else -float(g.budget)
    return g.dataset, g.emb, g.mean["reduction"], budget


def summarize(runs: Sequence[Run]) -> List[Group]:
    """Group runs by (dataset, emb, budget) and average over seeds.

    Returns:
        Groups sorted by dataset, emb, then mean reduction ascending, each with its AUC delta
        against its dataset's ``full`` runs (None without them).
    """
    by_key: Dict[Tuple[str, str, Optional[float]], List[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    refs = full_refs(runs)
    groups = []
    for (dataset, emb, budget), members in by_key.items():
        mean, std = {}, {}
        for stat, _ in STATS:
            values = [r.value(stat) for r in members]
            mean[stat], std[stat] = statistics.fmean(values), _std(values)
        dims = [d for d in (r.active_dim() for r in members) if d is not None]
        g = Group(dataset, emb, budget, members, mean, std,
                  active_dim=statistics.fmean(dims) if dims else None)
        ref = refs.get(dataset)
        if ref is not None:
            g.auc_delta = mean["auc"] - ref.mean
            g.delta = auc_delta(members, ref)
        groups.append(g)
    groups.sort(key=_reduction_order)
    return groups


def _budget_label(budget: Optional[float]) -> str:
    return "none" if budget is None else f"{budget:g}"


def _fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _paired_label(delta: Optional[Delta]) -> str:
    if delta is None:
        return "n/a"
    return f"on {delta.on}" if delta.paired else "no"


def markdown_table(groups: Sequence[Group]) -> str:
    """The summary as a Markdown table, one line per group (see module docstring)."""
    header = ["dataset", "emb", "budget", "seeds", "AUC", "AUC delta ± std", "paired",
              "accuracy", "logloss", "NE", "embedding MiB", "reduction (x)", "D_active",
              "examples/s"]
    rows = []
    for g in groups:
        cells = {s: f"{_fmt(g.mean[s], d)} ± {_fmt(g.std[s], d)}" for s, d in STATS}
        rows.append([
            g.dataset, g.emb, _budget_label(g.budget), str(len(g.runs)), cells["auc"],
            "n/a" if g.delta is None else g.delta.cell(), _paired_label(g.delta),
            cells["accuracy"], cells["logloss"], cells["ne"], cells["mib"], cells["reduction"],
            "n/a" if g.active_dim is None else f"{g.active_dim:.1f}", cells["examples_per_second"]])
    return _md(header, rows)


def _methods(groups: Sequence[Group], infeasible: Sequence[Infeasible] = ()) -> List[Tuple[str, str]]:
    """(dataset, method) of every group and infeasible point but ``full``'s, sorted."""
    keys = {(g.dataset, g.emb) for g in groups} | {(p.dataset, p.emb) for p in infeasible}
    return sorted(k for k in keys if k[1] != FULL)


def best_within(groups: Sequence[Group], tolerance: float) -> Dict[Tuple[str, str], Optional[Group]]:
    """The headline at one tolerance.

    Returns:
        For every (dataset, method other than ``full``) of a dataset with ``full`` runs, the
        group with the largest mean reduction among those whose mean AUC is at least ``full``'s
        mean AUC minus ``tolerance``; None when no group of the method is.
    """
    best: Dict[Tuple[str, str], Optional[Group]] = {}
    have_full = {g.dataset for g in groups if g.auc_delta is not None}
    for key in _methods(groups):
        if key[0] in have_full:
            best[key] = None
    for g in groups:
        if g.emb == FULL or g.auc_delta is None or g.auc_delta < -tolerance - _EPS:
            continue
        current = best[(g.dataset, g.emb)]
        if current is None or g.mean["reduction"] > current.mean["reduction"]:
            best[(g.dataset, g.emb)] = g
    return best


def headline_table(groups: Sequence[Group], tolerances: Sequence[float],
                   infeasible: Sequence[Infeasible] = ()) -> str:
    """:func:`best_within` at each tolerance as one Markdown table, rows by method then
    tolerance; a method with no qualifying group shows "no point within", one with only
    infeasible points "infeasible only"."""
    header = ["dataset", "method", "within", "budget", "seeds", "reduction (x)",
              "ΔAUC ± AUC std", "paired ΔAUC ± std"]
    picks = {tol: best_within(groups, tol) for tol in tolerances}
    feasible = set(_methods(groups))
    rows = []
    for key in _methods(groups, infeasible):
        for tol in tolerances:
            lead = [key[0], METHOD_LABELS.get(key[1], key[1]), f"{tol:g}"]
            if key not in feasible:
                rows.append(lead + ["-", "-", "infeasible only", "-", "-"])
                continue
            if key not in picks[tol]:
                rows.append(lead + ["-", "-", f"no `{FULL}` runs", "-", "-"])
                continue
            g = picks[tol][key]
            if g is None:
                rows.append(lead + ["-", "-", "no point within", "-", "-"])
                continue
            paired = g.delta.cell() + f" (n={g.delta.n})" if g.delta.paired else "n/a (seeds differ)"
            rows.append(lead + [
                _budget_label(g.budget), str(len(g.runs)),
                f"{_fmt(g.mean['reduction'], 2)} ± {_fmt(g.std['reduction'], 2)}",
                f"{g.auc_delta:+.4f} ± {g.std['auc']:.4f}", paired])
    return _md(header, rows)


def full_lines(runs: Sequence[Run]) -> str:
    """``full``'s own AUC mean ± seed std per dataset, the yardstick of the headline."""
    refs = full_refs(runs)
    lines = [f"- {d}: `{FULL}` AUC {r.mean:.4f} ± {r.std:.4f} over {r.n} runs"
             for d, r in sorted(refs.items())]
    return "\n".join(lines or [f"- no `{FULL}` runs: no AUC deltas"]) + "\n"


def nearest_point(groups: Sequence[Group], target: float,
                  factor: float = MILESTONE_FACTOR) -> Tuple[Optional[Group], str]:
    """The group of one method whose mean reduction is nearest ``target`` (in ratio), if within
    ``factor`` of it.

    Args:
        groups: one method's groups of one dataset.
        target: a reduction, e.g. 100.0.
        factor: how far off (a ratio, either side) a point may be.

    Returns:
        ``(group, "")``, or ``(None, why)``: "not reached" when every point is below
        ``target / factor``, else "no point within {factor}x" (the method jumps past it).
    """
    near = [g for g in groups if target / factor <= g.mean["reduction"] <= target * factor]
    if near:
        return min(near, key=lambda g: (abs(math.log(g.mean["reduction"] / target)),
                                        -g.mean["reduction"])), ""
    if all(g.mean["reduction"] < target / factor for g in groups):
        return None, "not reached"
    return None, f"no point within {factor:g}x"


def milestone_table(groups: Sequence[Group], targets: Sequence[float] = MILESTONES) -> str:
    """Per method, the AUC delta (as in the main table) of its point nearest each target
    reduction; cells read "ΔAUC ± std (reduction, budget)"."""
    header = ["dataset", "method", *[f"{t:g}x" for t in targets]]
    rows = []
    for dataset, emb in _methods(groups):
        mine = [g for g in groups if g.dataset == dataset and g.emb == emb]
        row = [dataset, METHOD_LABELS.get(emb, emb)]
        for target in targets:
            g, why = nearest_point(mine, target)
            if g is None:
                row.append(why)
                continue
            delta = "ΔAUC n/a" if g.delta is None else g.delta.cell()
            row.append(f"{delta} ({_fmt(g.mean['reduction'], 1)}x, budget {_budget_label(g.budget)})")
        rows.append(row)
    return _md(header, rows)


def infeasible_table(points: Sequence[Infeasible]) -> str:
    """The infeasible points, one row per (dataset, method, budget, reason) with its seeds."""
    seeds: Dict[Tuple[str, str, Optional[float], str], List[str]] = {}
    for p in points:
        seeds.setdefault((p.dataset, p.emb, p.budget, p.reason), []).append(str(p.seed))
    order = sorted(seeds, key=lambda k: (k[0], k[1], -math.inf if k[2] is None else -float(k[2]), k[3]))
    rows = [[d, METHOD_LABELS.get(e, e), _budget_label(b), ", ".join(sorted(seeds[(d, e, b, r)])),
             r.replace("|", "\\|").replace("\n", " ")] for d, e, b, r in order]
    return _md(["dataset", "method", "budget", "seeds", "reason"], rows) if rows else "None.\n"


def _safe(name: str) -> str:
    """``name`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # Agg draws without a display and without pyplot's global state
    fig.savefig(path, dpi=120)
    return path


def reduction_ticks(reductions: Sequence[float]) -> List[float]:
    """The 1-2-5 ticks (1, 2, 5, 10, ...) of a reduction axis spanning at least
    :data:`AXIS_SPAN` and every value in ``reductions``, ends rounded out to a tick."""
    lo = min([AXIS_SPAN[0], *reductions])
    hi = max([AXIS_SPAN[1], *reductions])
    exps = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = sorted(round(m * 10.0**e, 12) for e in exps for m in (1, 2, 5))
    first = max(t for t in ticks if t <= lo * (1 + 1e-9))
    last = min(t for t in ticks if t >= hi * (1 - 1e-9))
    return [t for t in ticks if first <= t <= last]


def _format_reduction_axis(ax, reductions: Sequence[float]) -> None:
    """Log x axis with :func:`reduction_ticks` labelled "10x"; minor ticks unlabelled."""
    ticks = reduction_ticks(reductions)
    ax.set_xscale("log")
    ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured embedding-size reduction (full bytes / bytes, log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _method_colors(groups: Sequence[Group]) -> Dict[str, Any]:
    """One color per method, the same in every figure."""
    methods = sorted({g.emb for g in groups if g.emb != FULL})
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {emb: cmap(i % cmap.N) for i, emb in enumerate(methods)}


def _method_lines(ax, groups: Sequence[Group], colors: Dict[str, Any], y_of) -> List[float]:
    """Per method other than ``full``, a line with markers and seed-std error bars (both axes)
    through ``y_of(group) -> (mean, std)`` over its groups by reduction; returns the x values."""
    xs = []
    for emb in sorted({g.emb for g in groups if g.emb != FULL}):
        points = [g for g in groups if g.emb == emb and y_of(g) is not None]
        points.sort(key=lambda g: g.mean["reduction"])
        if not points:
            continue
        ys = [y_of(g) for g in points]
        x = [g.mean["reduction"] for g in points]
        ax.errorbar(x, [y[0] for y in ys], yerr=[y[1] for y in ys],
                    xerr=[g.std["reduction"] for g in points], marker="o", capsize=3,
                    color=colors[emb], label=METHOD_LABELS.get(emb, emb))
        xs += x
    return xs


def reduction_figure(groups: Sequence[Group], dataset: str, stat: str = "auc") -> Figure:
    """Test ``stat`` (``auc`` or ``accuracy``) of ``dataset`` against the measured reduction.

    A line with seed-std error bars per method, ``full`` as a band of its mean ± seed std.
    """
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.add_subplot()
    mine = [g for g in groups if g.dataset == dataset]
    full = [r.value(stat) for g in mine if g.emb == FULL for r in g.runs]
    if full:
        mean, std = statistics.fmean(full), _std(full)
        ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.25,
                   label=f"{FULL} (mean ± std, {len(full)} runs)")
        ax.axhline(mean, color="black", linestyle="--", linewidth=1)
    xs = _method_lines(ax, mine, _method_colors(groups), lambda g: (g.mean[stat], g.std[stat]))
    _format_reduction_axis(ax, xs)
    label = LABELS.get(stat, stat)
    ax.set_ylabel(f"test {label}")
    ax.set_title(f"{dataset}: test {label} vs measured embedding reduction")
    ax.legend(fontsize=8)
    return fig


def delta_figure(groups: Sequence[Group], dataset: str,
                 tolerances: Sequence[float] = TOLERANCES) -> Figure:
    """The AUC delta vs ``full`` of ``dataset`` (paired where seeds match, as in the table)
    against the measured reduction, with a line at minus each tolerance."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label=FULL)
    for i, tol in enumerate(sorted(tolerances)):
        ax.axhline(-tol, color="0.4", linestyle=[":", "-."][i % 2], linewidth=1,
                   label=f"-{tol:g} AUC")
    mine = [g for g in groups if g.dataset == dataset]
    xs = _method_lines(ax, mine, _method_colors(groups),
                       lambda g: None if g.delta is None else (g.delta.mean, g.delta.std))
    _format_reduction_axis(ax, xs)
    ax.set_ylabel(f"test AUC minus {FULL} (paired where seeds match)")
    ax.set_title(f"{dataset}: AUC delta vs measured embedding reduction")
    ax.legend(fontsize=8)
    return fig


def plot_reduction_figures(groups: Sequence[Group], out_dir: Path,
                           tolerances: Sequence[float] = TOLERANCES) -> List[Path]:
    """Write ``auc_vs_reduction``, ``accuracy_vs_reduction`` and (with ``full`` runs)
    ``auc_delta_vs_reduction`` PNGs per dataset, suffixed ``_<dataset>`` when there are several.

    Returns:
        The paths written.
    """
    datasets = sorted({g.dataset for g in groups})
    written = []
    for dataset in datasets:
        suffix = f"_{_safe(dataset)}" if len(datasets) > 1 else ""
        for stat in ("auc", "accuracy"):
            fig = reduction_figure(groups, dataset, stat)
            written.append(_save(fig, out_dir / f"{stat}_vs_reduction{suffix}.png"))
        if any(g.delta is not None for g in groups if g.dataset == dataset):
            fig = delta_figure(groups, dataset, tolerances)
            written.append(_save(fig, out_dir / f"auc_delta_vs_reduction{suffix}.png"))
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


def report_text(results: Results, groups: Sequence[Group], sources: Sequence[Path],
                tolerances: Sequence[float], plots: Sequence[Path] = ()) -> str:
    """The contents of ``report.md`` (see the module docstring for its sections)."""
    paired = sum(1 for g in groups if g.delta is not None and g.delta.paired)
    with_delta = sum(1 for g in groups if g.delta is not None)
    tols = ", ".join(f"{t:g}" for t in tolerances)
    return "\n".join([
        "# Results\n",
        f"{len(results.runs)} runs and {len(results.infeasible)} infeasible points from "
        f"{', '.join(str(s) for s in sources)}. Mean ± sample std over seeds; reduction = measured "
        "embedding_bytes_full / embedding_bytes. AUC delta: paired on `seed` (and `dataset_seed` "
        f"when recorded) for {paired} of {with_delta} groups, i.e. the mean ± std of per-seed "
        f"differences against the `{FULL}` run of the same seed; for the others (\"paired: no\") "
        f"mean AUC minus `{FULL}`'s mean AUC, ± the group's AUC std.\n",
        f"## Largest measured reduction within {tols} AUC of `{FULL}`\n",
        f"A group qualifies when its mean AUC is at least `{FULL}`'s mean AUC minus the "
        "tolerance. \"ΔAUC ± AUC std\" is that unpaired difference with the group's seed std; "
        f"`{FULL}`'s own seed std:\n",
        full_lines(results.runs),
        headline_table(groups, tolerances, results.infeasible),
        f"## AUC delta at {', '.join(f'{t:g}x' for t in MILESTONES)}\n",
        f"Each method's measured point nearest the target, if within a factor "
        f"{MILESTONE_FACTOR:g}; ΔAUC as in the table below.\n",
        milestone_table(groups),
        "## Infeasible points\n",
        "Budgets a method cannot reach (the run wrote `infeasible` instead of metrics).\n",
        infeasible_table(results.infeasible),
        "## All groups\n",
        markdown_table(groups),
        *[f"![{p.stem}]({p.name})\n" for p in plots],
    ])


def write_report(results: Results, groups: Sequence[Group], out_dir: Path,
                 sources: Sequence[Path], tolerances: Sequence[float] = TOLERANCES) -> List[Path]:
    """Write ``report.md`` and every plot of ``groups`` (``summarize(results.runs)``) into
    ``out_dir`` (created if needed).

    Returns:
        The paths written, ``report.md`` first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_reduction_figures(groups, out_dir, tolerances)
    plots += plot_allocations(groups, out_dir)
    report = out_dir / "report.md"
    report.write_text(report_text(results, groups, sources, tolerances, plots))
    return [report, *plots]


def parse_tolerances(text: str) -> Tuple[float, ...]:
    """``"0.001,0.005"`` -> ``(0.001, 0.005)``, for ``--tolerances``.

    Raises:
        argparse.ArgumentTypeError: naming the value when a part is not a number >= 0.
    """
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"tolerances must be comma-separated AUC differences >= 0 such as 0.001,0.005, "
            f"got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI entry point: ``python -m torchrec_fiited.report DIR... [--out OUTDIR]
    [--tolerances 0.001,0.005]``."""
    parser = argparse.ArgumentParser(prog="python -m torchrec_fiited.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories searched for metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: first DIR)")
    default = ",".join(f"{t:g}" for t in TOLERANCES)
    parser.add_argument("--tolerances", "--tolerance", type=parse_tolerances, default=TOLERANCES,
                        help=f"AUC below full still counted as no loss, comma-separated "
                             f"(default {default})")
    args = parser.parse_args(argv)
    paths = find_metrics(args.dirs)
    if not paths:
        parser.error(f"no metrics.json found under {', '.join(str(d) for d in args.dirs)}")
    results = load_results(paths)
    if not results.runs:
        parser.error(f"none of the {len(paths)} metrics.json files found is valid ("
                     f"{len(results.infeasible)} infeasible points, no runs; see warnings)")
    groups = summarize(results.runs)
    written = write_report(results, groups, args.out or args.dirs[0], args.dirs, args.tolerances)
    print(terminal_table(groups).rstrip("\n"))
    if results.infeasible:
        print(f"{len(results.infeasible)} infeasible points (listed in the report)")
    print(f"wrote {written[0]} and {len(written) - 1} plots in {written[0].parent}")


def terminal_table(groups: Sequence[Group]) -> str:
    """The few columns worth a terminal: one line per group, paired AUC delta and reduction.

    The full tables (headline, milestones, every statistic) are in report.md.
    """
    header = ["dataset", "emb", "budget", "seeds", "AUC", "AUC delta ± std", "reduction (x)",
              "embedding MiB", "examples/s"]
    rows = [[g.dataset, g.emb, _budget_label(g.budget), str(len(g.runs)),
             f"{_fmt(g.mean['auc'], 4)} ± {_fmt(g.std['auc'], 4)}",
             "n/a" if g.delta is None else g.delta.cell(), _fmt(g.mean["reduction"], 2),
             _fmt(g.mean["mib"], 2), _fmt(g.mean["examples_per_second"], 0)] for g in groups]
    return _md(header, rows)


if __name__ == "__main__":
    main()
