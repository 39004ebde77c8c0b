"""What a pruning cycle costs, against the sample size m and against the number of resident ids.

Issue 12, acceptance 2: a cycle should cost <= 2% of T=1000 training steps at the app's full
sizes, and its cost should grow with the sample size m, not with the number of seen (resident)
ids. This measures both curves on the hard preset's 26 tables (``--mixed`` of
``bench_lookup.py``: 10 to 10^6 rows, 5.57M in all), D=32, K=2 (the app's FIITED), batch 8192 of
Zipf(1.05) ids, L=1:

* the resident count is varied through the budget (each budget's pools fill by admission over
  ``--fill-steps`` training steps);
* m is varied on the same filled module (``FiitedConfig.sample_size``), each cycle after
  ``--gap`` untimed training steps so that it has something to decide; the median of
  ``--repeats`` cycles per m.

A cycle is reported in ms and as a share of T=1000 training steps of the same module (its best
step time). Run nothing else beside it.

Usage::

    .venv/bin/python benchmarks/bench_cycle.py --out cycle.json
    .venv/bin/python benchmarks/bench_cycle.py --quick          # smoke test
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lookup import BenchConfig, ZipfIds, to_kjt  # noqa: E402


def measure(cfg: BenchConfig, budget: float, sample_sizes: List[int], fill_steps: int, gap: int,
            repeats: int, K: int) -> List[Dict[str, Any]]:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

    tables = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg.embedding_dim, num_embeddings=E,
                                 feature_names=[f"f{t}"]) for t, E in enumerate(cfg.sizes())]
    config = FiitedConfig(num_chunks=K, budget=budget, prune_interval=0,
                          optimizer="rowwise_adagrad", learning_rate=cfg.learning_rate,
                          seed=cfg.seed)
    ebc = FiitedEmbeddingBagCollection(tables, config)
    zipf = ZipfIds(cfg)

    seen_keys: List[torch.Tensor] = []

    def step() -> float:
        b = zipf.batch(1)
        kjt = to_kjt(cfg, b)
        # Distinct (table, id) pairs the module has seen (untimed).
        table = torch.repeat_interleave(torch.arange(len(tables)),
                                        torch.tensor(kjt.length_per_key()))
        seen_keys.append(torch.unique(table * (1 << 40) + kjt.values()))
        start = time.perf_counter()
        ebc(kjt).values().backward(b.grad)
        return time.perf_counter() - start

    for _ in range(fill_steps):
        step()
    ebc.prune()
    step_s = min(step() for _ in range(5))
    rows = []
    for m in sample_sizes:
        ebc._config = dataclasses.replace(config, sample_size=m)
        times = []
        for _ in range(repeats):
            for _ in range(gap):
                step()
            start = time.perf_counter()
            report = ebc.prune()
            times.append(time.perf_counter() - start)
        seen = sum(int(e.num_seen) for e in ebc.store.entries.values())
        sampled = sum(r["num_sampled"] for r in report.values())
        cycle_s = statistics.median(times)
        distinct = int(torch.unique(torch.cat(seen_keys)).numel())
        rows.append({"budget": budget, "resident": seen, "seen_ids": distinct, "m": m,
                     "sampled": sampled,
                     "cycle_ms": 1e3 * cycle_s, "step_ms": 1e3 * step_s,
                     "pct_of_1000_steps": 100 * cycle_s / (1000 * step_s)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.05, 0.25])
    parser.add_argument("--sample-sizes", nargs="+", type=int, default=[4096, 16384, 65536, 262144])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--num-chunks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--fill-steps", type=int, default=30)
    parser.add_argument("--gap", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row-scales", nargs="+", type=float, default=None,
                        help="instead of --budgets: every table's rows times each scale at the "
                             "fixed bytes of the first budget at scale 1 (more ids seen, the same "
                             "resident entries)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--out", help="write the measurements as JSON here")
    a = parser.parse_args()
    from torchrec_fiited.data.clicklog import ClickLogConfig, clicklog_cardinalities

    sizes = clicklog_cardinalities(ClickLogConfig(cardinality_scale=0.02 if a.quick else 1.0))
    cfg = BenchConfig(num_tables=len(sizes), table_rows=tuple(sizes), embedding_dim=a.dim,
                      batch_size=512 if a.quick else a.batch_size, num_chunks=(a.num_chunks,))
    if a.quick:
        a.budgets, a.sample_sizes, a.fill_steps, a.repeats = [0.05, 0.25], [256, 1024], 4, 1
    rows = []
    if a.row_scales:
        # Fixed bytes: budget b at scale 1 is b / s at s times the rows (store v2 sizes nothing
        # by the id space), so the pools and entries stay, and only the ids seen grow.
        for scale in a.row_scales:
            scaled = dataclasses.replace(
                cfg, table_rows=tuple(max(1, int(r * scale)) for r in cfg.table_rows))
            for r in measure(scaled, a.budgets[0] / scale, a.sample_sizes, a.fill_steps, a.gap,
                             a.repeats, a.num_chunks):
                rows.append(dict(r, row_scale=scale))
    else:
        for budget in a.budgets:
            rows.extend(measure(cfg, budget, a.sample_sizes, a.fill_steps, a.gap, a.repeats,
                                a.num_chunks))
    print(f"{cfg.describe()} x D={a.dim}, K={a.num_chunks}, batch {cfg.batch_size}, L=1\n")
    print("| rows x | budget | ids seen | resident entries | m | sampled | cycle ms | step ms "
          "| % of 1000 steps |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.get('row_scale', 1)} | {r['budget']:.4g} | {r['seen_ids']:,} "
              f"| {r['resident']:,} | {r['m']:,} | {r['sampled']:,} | {r['cycle_ms']:.1f} "
              f"| {r['step_ms']:.1f} | {r['pct_of_1000_steps']:.3f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
