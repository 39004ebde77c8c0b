"""How far a sharded FIITED run under a binding budget drifts from one process.

Trains the app (hard synthetic preset) at ``--budget`` on one process and on 2 gloo processes
with every table row-wise (hash ranges) and column-wise, for each seed, and prints per plan: AUC
per seed, its mean and std, the measured bytes, whether every rank computed the same thresholds at
every cycle, and the thresholds' largest relative gap from one process's at the same cycle.

    .venv/bin/python benchmarks/dist_drift.py --budget 0.01 --seeds 0 1 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(plan: str, budget: float, seed: int, out: str, extra: List[str]) -> Dict[str, Any]:
    args = ["emb=fiited", f"budget={budget}", f"seed={seed}", "train.progress=false",
            f"hydra.run.dir={out}", *extra]
    if plan == "single":
        cmd = [sys.executable, "-m", "torchrec_fiited.train", *args]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
               "--nproc_per_node=2", "-m", "torchrec_fiited.train", f"train.sharding_type={plan}",
               *args]
    env = dict(os.environ, OMP_NUM_THREADS="1" if plan != "single" else "2")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def threshold_gap(cycles: List[Dict[str, Any]], ref: List[Dict[str, Any]]) -> float:
    """Largest |t - t_ref| / |t_ref| over the cycles and chunk thresholds both runs have."""
    by_step = {c["step"]: c["thresholds"] for c in ref}
    gap = 0.0
    for c in cycles:
        want = by_step.get(c["step"])
        if want is None:
            continue
        for pool, ts in c["thresholds"].items():
            for t, w in zip(ts, want.get(pool, [])):
                if w:
                    gap = max(gap, abs(t - w) / abs(w))
    return gap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.01)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plans", nargs="+", default=["single", "row_wise", "column_wise"])
    p.add_argument("--out", default="outputs/dist_drift")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = p.parse_args()
    results: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for seed in a.seeds:
        for plan in a.plans:
            out = os.path.join(a.out, f"{plan}_b{a.budget}_s{seed}")
            results.setdefault(plan, {})[seed] = run(plan, a.budget, seed, out, a.overrides)
    ref = results.get("single", {})
    print(f"budget {a.budget}, seeds {a.seeds}; hard synthetic preset, K=2; 2 gloo ranks")
    print("| plan | AUC per seed | mean | std | bytes (full) | same thresholds on every rank "
          "| max threshold gap vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    for plan, per_seed in results.items():
        aucs = [m["test_auc"] for m in per_seed.values()]
        std = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        same = all(m.get("thresholds_identical_across_ranks", True) for m in per_seed.values())
        gaps = [threshold_gap(m.get("cycle_thresholds", []), ref[s].get("cycle_thresholds", []))
                for s, m in per_seed.items() if plan != "single" and s in ref]
        m0 = next(iter(per_seed.values()))
        print(f"| {plan} | {' '.join(f'{x:.4f}' for x in aucs)} | {statistics.mean(aucs):.4f} | "
              f"{std:.4f} | {m0['embedding_bytes']:,} ({m0['embedding_bytes_full']:,}) | "
              f"{'yes' if same else 'NO'} | {max(gaps) if gaps else 0.0:.3f} |")


if __name__ == "__main__":
    main()
