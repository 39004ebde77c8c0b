"""Checks that a dataset rewards embedding capacity: the calibration of the hard synthetic data.

Reads the ``metrics.json`` of four arms trained on the same data seeds (``make calibrate``):

* ``full``: torchrec's EBC at full capacity;
* ``hash`` at budget 0.1: the hashing trick into 10x fewer rows;
* ``freq_oracle`` at budget 0.1: only the 10x fewer most frequent rows (training counts), the
  other ids read zeros;
* ``full_d4``: full capacity at a quarter of the dimension (``label=full_d4``).

and checks, per seed, against full: (a) hashing loses at least ``--hash-gap`` AUC; (b) the
frequency oracle stays within ``--oracle-gap``; (c) the quarter dimension loses at least
``--dim-factor`` times what the oracle loses, and at least ``--dim-gap``. Prints one row per seed
and exits 1 when a condition fails.

Usage::

    python -m torchrec_fiited.calibration multirun/calibrate
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

ARMS = ("full", "hash", "freq_oracle", "full_d4")


@dataclass(frozen=True)
class Thresholds:
    """What the data must show, in AUC against full."""

    hash_gap: float = 0.03
    oracle_gap: float = 0.005
    dim_gap: float = 0.01
    dim_factor: float = 2.0


def collect(dirs: Sequence[Path]) -> Dict[int, Dict[str, float]]:
    """seed -> arm -> test AUC, from every metrics.json under ``dirs``.

    Raises:
        ValueError: if two runs claim the same seed and arm (mixed-up directories).
    """
    table: Dict[int, Dict[str, float]] = {}
    for d in dirs:
        for path in sorted(Path(d).rglob("metrics.json")):
            m = json.loads(path.read_text())
            if m.get("emb") not in ARMS or "test_auc" not in m:
                continue
            arms = table.setdefault(int(m["seed"]), {})
            if m["emb"] in arms:
                raise ValueError(f"{path}: a second {m['emb']} run for seed {m['seed']}")
            arms[m["emb"]] = float(m["test_auc"])
    return table


def check(table: Dict[int, Dict[str, float]], limits: Thresholds) -> List[str]:
    """Failed conditions, as readable lines (empty: the data is calibrated)."""
    failures = []
    if not table:
        return ["no runs found"]
    for seed, arms in sorted(table.items()):
        missing = [a for a in ARMS if a not in arms]
        if missing:
            failures.append(f"seed {seed}: missing arms {missing}")
            continue
        full = arms["full"]
        hash_loss, oracle_loss, dim_loss = (full - arms[a] for a in ARMS[1:])
        if hash_loss < limits.hash_gap:
            failures.append(f"seed {seed}: (a) hashing loses {hash_loss:.4f} < {limits.hash_gap}")
        if oracle_loss > limits.oracle_gap:
            failures.append(f"seed {seed}: (b) oracle loses {oracle_loss:.4f} > {limits.oracle_gap}")
        if dim_loss < max(limits.dim_gap, limits.dim_factor * oracle_loss):
            failures.append(f"seed {seed}: (c) D/4 loses {dim_loss:.4f}, not clearly more than "
                            f"the oracle's {oracle_loss:.4f}")
    return failures


def render(table: Dict[int, Dict[str, float]]) -> str:
    """A Markdown table: AUC of full and each arm's delta against it, per seed."""
    lines = ["| seed | full AUC | (a) hash 10x | (b) freq. oracle 10x | (c) D/4 |",
             "|---|---|---|---|---|"]
    for seed, arms in sorted(table.items()):
        full = arms.get("full")
        cells = [f"{arms[a] - full:+.4f}" if full is not None and a in arms else "-"
                 for a in ARMS[1:]]
        lines.append(f"| {seed} | {full if full is None else f'{full:.4f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    defaults = Thresholds()
    for name in ("hash_gap", "oracle_gap", "dim_gap", "dim_factor"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = parser.parse_args(list(argv) or None)
    limits = Thresholds(args.hash_gap, args.oracle_gap, args.dim_gap, args.dim_factor)
    table = collect(args.dirs)
    print(render(table))
    failures = check(table, limits)
    for line in failures:
        print("FAIL", line)
    if not failures:
        print(f"calibrated: (a) hashing loses >= {limits.hash_gap}, (b) oracle within "
              f"{limits.oracle_gap}, (c) D/4 loses >= max({limits.dim_gap}, "
              f"{limits.dim_factor} x oracle) on every seed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
