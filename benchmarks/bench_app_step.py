"""The app's whole DLRM training step: FIITED and AdaEmbed against `emb=full`, side by side.

Issue 12, acceptance 1: on the hard synthetic preset at full scale (26 features, tables of 10 to
10^6 ids, 5.57M rows; ``dataset.cardinality_scale=1.0``), D=32 and D=64, batch 2048 and 8192,
one process, ``emb=fiited`` and ``emb=adaembed`` at budgets 0.25 and 0.01 should reach >= 1.0x
the examples/s of ``emb=full`` (torchrec's EmbeddingBagCollection with FBGEMM's fused rowwise
Adagrad) measured in the same run.

What is timed is the app's own step (``app/loop.py``: forward, loss, backward with the fused
embedding update, the dense Adam step), built by the app's ``TrainRecipe`` from the same Hydra
config as ``python -m torchrec_fiited.train``. Each configuration runs in its own process, one
after another, on the same data (the seed fixes it): ``--warmup`` untimed steps (the FIITED
tables fill by admission), then ``--steps`` timed ones. Pruning cycles are left out of the
step (``emb.prune_interval`` beyond the run; ``benchmarks/bench_lookup.py`` times a cycle as a
share of 1000 steps), so the figure is the steady step that dominates an epoch.

Times on a shared 2-core machine move between runs; run nothing else beside it. Ratios are
against ``full`` in the same (D, batch) block. With ``--rounds R`` every configuration of a block
runs R times, round-robin (full, fiited, ..., full, fiited, ...), and the fastest round of each
counts (as ``bench_lookup.py``'s best iteration: interference only ever adds time); the median
round is kept in the JSON. One round of the grid moved single points by 5-30% (a 20-step mean
beside the VM's neighbours), more than the methods differ. Every step is also timed on its own:
"x full (median step)" is the ratio of the median step times over all rounds (a step slowed by
a neighbour moves a mean, not a median).

``--interleave`` builds every method of a block in one process instead and alternates them step
by step (full, fiited, ..., full, fiited, ...; the order rotates every step), so that a slow
phase of the machine falls on all of them alike; the figures are per-method median step times
and their ratios. One process per configuration moved whole runs by 10-20% here (bench_lookup:
the same build's step at 204 and 244 ms in two processes), more than a step of the methods
differs.

Usage::

    .venv/bin/python benchmarks/bench_app_step.py --out app_step.json        # the grid above
    .venv/bin/python benchmarks/bench_app_step.py --interleave --steps 40 --out app_step.json
    .venv/bin/python benchmarks/bench_app_step.py --rounds 3 --out app_step.json  # best of 3
    .venv/bin/python benchmarks/bench_app_step.py --dims 32 --batches 2048 --steps 20
    .venv/bin/python benchmarks/bench_app_step.py --quick                     # smoke test
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = (("full", None), ("fiited", 0.25), ("fiited", 0.01), ("adaembed", 0.25),
           ("adaembed", 0.01))


def overrides(emb: str, budget: float, dim: int, batch: int, steps: int, scale: float,
              seed: int) -> List[str]:
    """Hydra overrides of one configuration (the app's config, conf/)."""
    out = [
        f"emb={emb}", f"budget={budget}", f"seed={seed}",
        f"dataset.cardinality_scale={scale}", f"dataset.num_train={steps * batch}",
        "dataset.num_test=1000", f"model.embedding_dim={dim}", f"model.dense_arch=[64,{dim}]",
        f"train.batch_size={batch}", "train.progress=false",
    ]
    if emb != "full":
        out.append(f"emb.prune_interval={10 * steps}")  # no cycle inside the run
    return out


def build(args: Dict[str, Any]):
    """The app's recipe for one configuration and its first warmup + steps batches."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from torchrec_fiited.app.recipe import TrainRecipe
    from torchrec_fiited.train import config_dir

    total = args["warmup"] + args["steps"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides(
            args["emb"], args["budget"] or 1.0, args["dim"], args["batch"], total, args["scale"],
            args["seed"],
        ))
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["emb_name"] = args["emb"]
    recipe = TrainRecipe(plain, os.path.join(args["tmp"], f"{args['emb']}_{args['budget']}"))
    recipe.setup()
    return recipe, list(recipe.train_data.epoch(0, 0))[:total]


def run_block(block: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every configuration of ``block`` in this process (one, or with ``--interleave`` all of a
    D and batch): build all, train ``warmup`` steps of each, then time ``steps`` steps of each,
    alternately, the order rotating every step. Each step is timed alone (by ``train``, inside
    its loop)."""
    import torch

    from torchrec_fiited.app.loop import TrainResult, train

    torch.set_num_threads(block[0]["threads"] or torch.get_num_threads())
    built = [build(args) for args in block]
    warm = [train(r.model, b[: a["warmup"]], r.dense_optimizer, progress=False)
            for (r, b), a in zip(built, block)]
    timed = [TrainResult() for _ in block]
    steps: List[List[float]] = [[] for _ in block]
    first, n = block[0]["warmup"], block[0]["steps"]
    for s in range(n):
        for j in range(len(block)):
            i = (s + j) % len(block)
            recipe, batches = built[i]
            before = timed[i].seconds
            train(recipe.model, batches[first + s : first + s + 1], recipe.dense_optimizer,
                  progress=False, result=timed[i])
            steps[i].append(timed[i].seconds - before)
    return [{
        **{k: args[k] for k in ("emb", "budget", "dim", "batch")},
        "steps": t.steps, "seconds": t.seconds, "step_seconds": st, "losses": t.losses,
        "examples_per_second": t.examples_per_second,
        "warmup_examples_per_second": w.examples_per_second,
        "embedding_bytes": r._embedding_bytes(), "embedding_bytes_full": r.full_bytes,
    } for args, (r, _), t, st, w in zip(block, built, timed, steps, warm)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--batches", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="emb[:budget] items, default full fiited:0.25 fiited:0.01 "
                             "adaembed:0.25 adaembed:0.01")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--scale", type=float, default=1.0, help="dataset.cardinality_scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each configuration, round-robin; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--interleave", action="store_true",
                        help="all methods of a block in one process, steps alternating")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--block", help=argparse.SUPPRESS)  # internal: a block, interleaved
    a = parser.parse_args()
    if a.one:
        print(json.dumps(run_block([json.loads(a.one)])[0]))
        return 0
    if a.block:
        print(json.dumps(run_block(json.loads(a.block))))
        return 0
    if a.quick:
        a.dims, a.batches, a.steps, a.warmup, a.scale = [16], [256], 3, 1, 0.01
    methods = METHODS if a.methods is None else [
        (m.split(":")[0], float(m.split(":")[1]) if ":" in m else None) for m in a.methods
    ]
    rows = []
    for dim in a.dims:
        for batch in a.batches:
            runs: List[List[Dict[str, Any]]] = [[] for _ in methods]
            tmp = os.path.join("/tmp", f"bench_app_step_{os.getpid()}")
            configs = [dict(emb=emb, budget=budget, dim=dim, batch=batch, steps=a.steps,
                            warmup=a.warmup, scale=a.scale, seed=a.seed, threads=a.threads,
                            tmp=tmp) for emb, budget in methods]
            for _ in range(max(1, a.rounds)):
                jobs = ([("--block", configs)] if a.interleave
                        else [("--one", c) for c in configs])
                for flag, payload in jobs:
                    start = time.perf_counter()
                    p = subprocess.run([sys.executable, __file__, flag, json.dumps(payload)],
                                       cwd=REPO, capture_output=True, text=True)
                    if p.returncode != 0:
                        sys.stderr.write(p.stderr[-4000:])
                        return 1
                    got = json.loads(p.stdout.strip().splitlines()[-1])
                    got = got if isinstance(got, list) else [got]
                    for r in got:
                        r["wall_s"] = time.perf_counter() - start
                        runs[next(i for i, c in enumerate(configs)
                                  if (c["emb"], c["budget"]) == (r["emb"], r["budget"]))].append(r)
            block = []
            for rounds in runs:
                speeds = sorted(r["examples_per_second"] for r in rounds)
                best = max(rounds, key=lambda r: r["examples_per_second"])
                steps = [s for r in rounds for s in r["step_seconds"]]
                block.append({**best, "rounds_examples_per_second": speeds,
                              "median_examples_per_second": speeds[len(speeds) // 2],
                              "median_step_seconds": statistics.median(steps)})
            full = next((r for r in block if r["emb"] == "full"), None)
            for r in block:
                r["x_full"] = r["examples_per_second"] / full["examples_per_second"] if full else None
                r["x_full_median_step"] = (full["median_step_seconds"] / r["median_step_seconds"]
                                           if full else None)
            rows.extend(block)
    print(f"{'D':>3} {'batch':>6} {'method':<9} {'budget':>6} {'ex/s':>10} {'x full':>7} "
          f"{'x full (median step)':>20} {'reduction':>9}")
    for r in rows:
        red = r["embedding_bytes_full"] / r["embedding_bytes"]
        x = f"{r['x_full']:.2f}" if r["x_full"] is not None else "-"
        xm = f"{r['x_full_median_step']:.2f}" if r["x_full_median_step"] is not None else "-"
        print(f"{r['dim']:>3} {r['batch']:>6} {r['emb']:<9} {r['budget'] or 1.0:>6} "
              f"{r['examples_per_second']:>10,.0f} {x:>7} {xm:>20} {red:>8.1f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
