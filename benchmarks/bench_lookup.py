"""Throughput of FIITED's native lookup and fused update against FBGEMM TBE and nn.EmbeddingBag.

Workload (defaults, from shared/reference/performance-anchors.md): 8 tables x 200k rows x D=64
fp32, batch 8192, Zipf(1.05) ids, pooling factors L=1 and L=20, K=4, budgets 0.25 and 0.01.
Every path runs in its own process (spawned one after another in this run; ``--in-process``
runs them in this one, for smoke tests), so its peak RSS is its own; results are printed side
by side as ratios to TBE, because absolute times on a shared machine move between runs.

Issue 11, acceptance 5: forward+backward+update of the module (store v2: the hash-table probe
of every id and the admission of new ids are part of its training forward) at >= 1.0x FBGEMM
TBE at budgets 0.25 and 0.01, L=1 and L=20, K=4; one pruning cycle <= 2% of 1000 steps. The
table's last column says whether a row meets both ("step x TBE" >= 1 and "prune %" <= 2).

Paths:
    tbe          FBGEMM SplitTableBatchedEmbeddingBagsCodegen on CPU, EXACT_ROWWISE_ADAGRAD.
    embbag       torch.nn.EmbeddingBag(sparse=True) per table + sparse SGD.
    fiited       FiitedEmbeddingBagCollection (KJT in, KeyedTensor out, autograd backward),
                 rowwise Adagrad, K chunks, budget b, prune_interval=0. Before timing, it trains
                 on ``fill_steps`` fresh L=20 batches of the same distribution (so that the
                 pool's hash table and chunk slots are as full as training makes them), then
                 runs one pruning cycle, so the pool holds the chunks a trained model would.
                 Each training step probes the hash table for every id, admits the new ones
                 (sketch estimate, hash insert, chunk allocation), pools, and in backward
                 updates live chunks and adds the misses' utility to the sketch.
    fiited-ops   the same store, calling the ops directly: one hash-table probe per feature
                 (ids -> keys -> entries), one lookup_forward_out per feature into a fresh
                 [B, T * D] output, one fused_backward per table (misses skipped, -1): the
                 kernels without the module's Python work, and without admission or the
                 sketch update of the misses (the resident set stays as built).

The pruning cycle is timed with ``module.prune()`` after ``cycle_gap`` untimed training steps
(so each timed cycle has something to decide), the median of ``prune_repeats``, and reported as
a fraction of T=1000 training steps of the module (best step time).

Times: each measurement runs at least ``iterations`` times and ``min_measure_s`` seconds. The
machine these numbers come from is shared (2 vCPU), and interference only ever adds time, so the
ratios use the fastest iteration ("best"); the median is printed beside it.

Usage::

    .venv/bin/python benchmarks/bench_lookup.py --out lookup.json   # the acceptance grid
    .venv/bin/python benchmarks/bench_lookup.py --quick             # smoke test (small sizes)
    .venv/bin/python benchmarks/bench_lookup.py --threads 1 --budgets 0.01 --paths tbe fiited
    .venv/bin/python benchmarks/bench_lookup.py --quick --profile 5 --budgets 0.01
        # where a module step's time goes: torch.profiler ops and Python functions (cProfile)
"""

import argparse
import dataclasses
import itertools
import json
import logging
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

PATHS = ("tbe", "embbag", "fiited", "fiited-ops")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long.

    Args:
        num_tables: T tables, one feature each.
        num_embeddings: E rows per table.
        table_rows: rows of each table, overriding ``num_tables`` x ``num_embeddings`` (mixed
            sizes; ``--mixed``: the hard preset's 26 tables of 10 to 10^6 rows).
        embedding_dim: D.
        batch_size: B.
        zipf_alpha: ids are Zipf(alpha) over a random permutation of each table's rows.
        pooling_factors: L values, each a separate measurement (every bag holds exactly L ids).
        num_chunks: K values for the FIITED paths.
        budgets: budget values for the FIITED paths (store v2: the whole module's bytes).
        warmup: untimed iterations before each measurement.
        iterations: timed iterations, at least.
        min_measure_s: seconds each measurement runs, at least.
        fill_steps: training steps on fresh L=``fill_pooling_factor`` batches that fill the
            FIITED pool before the pruning cycle.
        fill_pooling_factor: L of the fill batches.
        prune_repeats: pruning cycles timed (median).
        cycle_gap: untimed training steps before each timed pruning cycle.
        prune_interval: T of the pruning-cost fraction (cycle time / T training steps).
        num_batches: distinct batches, cycled.
        learning_rate: of every optimizer.
        num_threads: intra-op threads of every path (0: torch's default, the core count).
        seed: of the ids and of every module.
    """

    num_tables: int = 8
    num_embeddings: int = 200_000
    table_rows: Tuple[int, ...] = ()
    embedding_dim: int = 64
    batch_size: int = 8192
    zipf_alpha: float = 1.05
    pooling_factors: Tuple[int, ...] = (1, 20)
    num_chunks: Tuple[int, ...] = (4,)
    budgets: Tuple[float, ...] = (0.25, 0.01)
    warmup: int = 3
    iterations: int = 10
    min_measure_s: float = 1.0
    fill_steps: int = 24
    fill_pooling_factor: int = 20
    prune_repeats: int = 3
    cycle_gap: int = 4
    prune_interval: int = 1000
    num_batches: int = 4
    learning_rate: float = 0.01
    num_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_tables", "num_embeddings", "embedding_dim", "batch_size", "iterations",
                     "prune_repeats", "prune_interval", "num_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for K in self.num_chunks:
            if self.embedding_dim % K:
                raise ValueError(f"embedding_dim={self.embedding_dim} is not divisible by K={K}")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budgets must be in (0, 1], got {b}")
        if not self.zipf_alpha > 0:
            raise ValueError(f"zipf_alpha must be > 0, got {self.zipf_alpha}")
        if self.table_rows and (len(self.table_rows) != self.num_tables
                                or min(self.table_rows) < 1):
            raise ValueError(f"table_rows must give num_tables={self.num_tables} sizes >= 1, "
                             f"got {self.table_rows}")

    def sizes(self) -> List[int]:
        """Rows of each table."""
        return list(self.table_rows) or [self.num_embeddings] * self.num_tables

    def describe(self) -> str:
        if not self.table_rows:
            return f"{self.num_tables} tables x {self.num_embeddings} rows"
        return (f"{self.num_tables} tables of {min(self.table_rows)} to {max(self.table_rows)} "
                f"rows ({sum(self.table_rows):,} in all)")


QUICK = BenchConfig(num_tables=2, num_embeddings=20_000, batch_size=512, num_chunks=(4,),
                    budgets=(0.25, 0.01), warmup=1, iterations=3, min_measure_s=0.0, fill_steps=4,
                    prune_repeats=1, cycle_gap=1, num_batches=2)


# ---- data -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch for all tables: per-table ids int64 [B * L] and the shared offsets [B + 1]."""

    ids: List[torch.Tensor]
    offsets: torch.Tensor
    grad: torch.Tensor  # fp32 [B, T * D], the upstream gradient used by every path


class ZipfIds:
    """Zipf(alpha) ids over each table's rows, the hot ids spread by a fixed permutation."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        cdfs: Dict[int, torch.Tensor] = {}
        for E in set(cfg.sizes()):
            cdf = torch.cumsum(torch.arange(1, E + 1, dtype=torch.float64).pow(-cfg.zipf_alpha), 0)
            cdfs[E] = cdf / cdf[-1]
        self.cdfs = [cdfs[E] for E in cfg.sizes()]
        self.perms = [torch.randperm(E, generator=self.gen) for E in cfg.sizes()]

    def batch(self, L: int) -> Batch:
        cfg = self.cfg
        n = cfg.batch_size * L
        ids = []
        for perm, cdf in zip(self.perms, self.cdfs):
            u = torch.rand(n, generator=self.gen, dtype=torch.float64)
            ids.append(perm[torch.searchsorted(cdf, u).clamp(max=perm.numel() - 1)])
        grad = torch.randn(cfg.batch_size, cfg.num_tables * cfg.embedding_dim, generator=self.gen)
        return Batch(ids, torch.arange(0, n + 1, L, dtype=torch.int64), grad)


def time_it(cfg: BenchConfig, fn: Callable[[int], Any]) -> Tuple[float, float]:
    """(best, median) seconds of fn(i) after ``warmup`` calls, over at least ``iterations``
    calls and ``min_measure_s`` seconds."""
    for i in range(cfg.warmup):
        fn(i)
    times: List[float] = []
    while len(times) < cfg.iterations or sum(times) < cfg.min_measure_s:
        start = time.perf_counter()
        fn(cfg.warmup + len(times))
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def timings(cfg: BenchConfig, forward: Callable[[int], Any], step: Callable[[int], Any]
            ) -> Dict[str, float]:
    fwd, fwd_med = time_it(cfg, forward)
    stp, stp_med = time_it(cfg, step)
    return {"fwd_s": fwd, "fwd_med_s": fwd_med, "step_s": stp, "step_med_s": stp_med}


# ---- paths ----------------------------------------------------------------------------------


def run_tbe(cfg: BenchConfig, batches: List[Batch]) -> Dict[str, float]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    specs = [(E, cfg.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for E in cfg.sizes()]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=cfg.learning_rate, device="cpu",
    )
    inputs = []
    for b in batches:
        n = b.ids[0].numel()
        offsets = torch.cat([b.offsets[:-1] + t * n for t in range(cfg.num_tables)]
                            + [torch.tensor([cfg.num_tables * n])])
        inputs.append((torch.cat(b.ids), offsets, b.grad))

    def forward(i: int) -> None:
        with torch.no_grad():
            tbe(inputs[i % len(inputs)][0], inputs[i % len(inputs)][1])

    def step(i: int) -> None:
        ids, offsets, grad = inputs[i % len(inputs)]
        tbe(ids, offsets).backward(grad)

    return timings(cfg, forward, step)


def run_embbag(cfg: BenchConfig, batches: List[Batch]) -> Dict[str, float]:
    bags = [torch.nn.EmbeddingBag(E, cfg.embedding_dim, mode="sum", sparse=True)
            for E in cfg.sizes()]
    opt = torch.optim.SGD([p for bag in bags for p in bag.parameters()], lr=cfg.learning_rate)

    def pooled(b: Batch) -> torch.Tensor:
        return torch.cat([bag(ids, b.offsets[:-1]) for bag, ids in zip(bags, b.ids)], dim=1)

    def forward(i: int) -> None:
        with torch.no_grad():
            pooled(batches[i % len(batches)])

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        pooled(b).backward(b.grad)
        opt.step()

    return timings(cfg, forward, step)


def to_kjt(cfg: BenchConfig, b: Batch):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    L = b.ids[0].numel() // cfg.batch_size
    return KeyedJaggedTensor.from_offsets_sync(
        keys=[f"f{t}" for t in range(cfg.num_tables)], values=torch.cat(b.ids),
        offsets=torch.arange(0, cfg.num_tables * b.ids[0].numel() + 1, L),
    )


def build_fiited(cfg: BenchConfig, K: int, budget: float, zipf: ZipfIds, batches: List[Batch]):
    """A FIITED module trained on ``fill_steps`` fresh batches and once on each timed batch (so
    that every path has seen the timed ids), then pruned once."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

    tables = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg.embedding_dim,
                                 num_embeddings=E, feature_names=[f"f{t}"])
              for t, E in enumerate(cfg.sizes())]
    config = FiitedConfig(num_chunks=K, budget=budget, prune_interval=0,
                          optimizer="rowwise_adagrad", learning_rate=cfg.learning_rate,
                          seed=cfg.seed)
    ebc = FiitedEmbeddingBagCollection(tables, config)
    fill = (zipf.batch(cfg.fill_pooling_factor) for _ in range(cfg.fill_steps))  # lazily: RSS
    for b in itertools.chain(fill, batches):
        ebc(to_kjt(cfg, b)).values().backward(b.grad)
    ebc.prune()
    return ebc


def entries_of(ebc, table: str, ids: torch.Tensor) -> torch.Tensor:
    """The hash-table probe: entry int64 [n] of each id of ``table`` (the null entry if absent)."""
    return ebc.store.entries_of(table).lookup(ebc.store.keys(table, ids))


def live_fractions(ebc, batches: List[Batch]) -> Dict[str, float]:
    """Live chunks over all chunks of the tables ("live", E x K per table); ids of the timed
    batches that are resident ("resident"); and chunks the timed batches look up that are live
    ("read": what the kernels load; Zipf ids mostly hit entries that kept their chunks)."""
    store = ebc.store
    names = [f"t{t}" for t in range(len(batches[0].ids))]
    K = store.num_chunks
    live = sum(int((store.entries_of(n).chunk_slots[store.table_entries(n)] >= 0).sum())
               for n in names)
    total = sum(store.layouts[n].num_entries * K for n in names)
    read = resident = 0.0
    for b in batches:
        for n, ids in zip(names, b.ids):
            entries = entries_of(ebc, n, ids)
            et = store.entries_of(n)
            resident += float((entries != et.null_entry).float().mean())
            read += float((et.chunk_slots[entries] >= 0).float().mean())
    lookups = len(batches) * len(names)
    return {"live_fraction": live / total, "resident_fraction": resident / lookups,
            "read_fraction": read / lookups}


def run_fiited(cfg: BenchConfig, batches: List[Batch], zipf: ZipfIds, K: int, budget: float
               ) -> Dict[str, float]:
    ebc = build_fiited(cfg, K, budget, zipf, batches)
    kjts = [to_kjt(cfg, b) for b in batches]

    def forward(i: int) -> None:
        with torch.no_grad():
            ebc(kjts[i % len(kjts)])

    def step(i: int) -> None:
        ebc(kjts[i % len(kjts)]).values().backward(batches[i % len(batches)].grad)

    result = timings(cfg, forward, step)
    cycles = []
    for r in range(cfg.prune_repeats):
        for i in range(cfg.cycle_gap):  # untimed: new utilities, admissions and evictions
            step(r * cfg.cycle_gap + i)
        start = time.perf_counter()
        ebc.prune()
        cycles.append(time.perf_counter() - start)
    result["prune_s"] = statistics.median(cycles)
    result.update(live_fractions(ebc, batches))
    return result


def run_fiited_ops(cfg: BenchConfig, batches: List[Batch], zipf: ZipfIds, K: int, budget: float
                   ) -> Dict[str, float]:
    from torchrec_fiited.ops import FusedParams, fused_backward
    from torchrec_fiited.ops.dispatch import lookup_forward_out

    ebc = build_fiited(cfg, K, budget, zipf, batches)
    store, D, first_step = ebc.store, cfg.embedding_dim, int(ebc.steps_done)
    names = [f"t{t}" for t in range(cfg.num_tables)]
    tables = [(store.pool_of(n), store.entries_of(n)) for n in names]

    def forward(i: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        b = batches[i % len(batches)]
        out = torch.empty(cfg.batch_size, cfg.num_tables * D)
        entries = [entries_of(ebc, n, ids) for n, ids in zip(names, b.ids)]  # the probe
        for t, ((pool, et), e) in enumerate(zip(tables, entries)):
            lookup_forward_out(pool.weights, et.chunk_slots, e, b.offsets, None, False,
                               out[:, t * D:(t + 1) * D])
        return out, entries

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        _, entries = forward(i)
        rows = torch.repeat_interleave(torch.arange(cfg.batch_size), b.offsets.diff())
        params = FusedParams("rowwise_adagrad", cfg.learning_rate, 1e-8, 0.0, "grad_access",
                             0.99, first_step + i)
        for t, ((pool, et), e) in enumerate(zip(tables, entries)):
            hits = torch.where(e == et.null_entry, -1, e)  # as the module: misses skipped
            fused_backward(b.grad[:, t * D:(t + 1) * D].contiguous(), rows, None, hits,
                           et.chunk_slots, et.utilities, pool.weights, pool.momentum, params,
                           et.addition_scale(params.step))

    result = timings(cfg, forward, step)
    result.update(live_fractions(ebc, batches))
    return result


def _child(cfg: BenchConfig, path: str, L: int, K: int, budget: float, queue) -> None:
    # torchrec's import warns about fx tracing once per process; it says nothing about this run.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    zipf = ZipfIds(cfg)
    batches = [zipf.batch(L) for _ in range(cfg.num_batches)]  # the same in every process
    if path == "tbe":
        result = run_tbe(cfg, batches)
    elif path == "embbag":
        result = run_embbag(cfg, batches)
    elif path == "fiited":
        result = run_fiited(cfg, batches, zipf, K, budget)
    else:
        result = run_fiited_ops(cfg, batches, zipf, K, budget)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


class _ListQueue(list):
    put = list.append


def measure(cfg: BenchConfig, path: str, L: int, K: int = 0, budget: float = 0.0,
            in_process: bool = False) -> Dict[str, float]:
    """Run one path in a fresh process (or this one); returns its timings and peak RSS (of this
    process's whole life when ``in_process``: then not the path's own)."""
    if in_process:
        out = _ListQueue()
        _child(cfg, path, L, K, budget, out)
        return out[0]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, path, L, K, budget, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ---- report ---------------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    K: int
    budget: float
    result: Dict[str, float] = field(default_factory=dict)


PRUNE_LIMIT_PCT = 2.0  # acceptance 5: one cycle <= 2% of 1000 steps


def prune_pct(cfg: BenchConfig, res: Dict[str, float]) -> float:
    """One pruning cycle as a percentage of ``prune_interval`` training steps."""
    return 100 * res["prune_s"] / (cfg.prune_interval * res["step_s"])


def report(cfg: BenchConfig, L: int, rows: Sequence[Row]) -> None:
    """A markdown table: throughput and ratios to TBE from the best iteration, ms best/median."""
    lookups = cfg.num_tables * cfg.batch_size * L
    tbe = next(r.result for r in rows if r.path == "tbe")
    print(f"\nL={L}: {cfg.describe()} x D={cfg.embedding_dim}, "
          f"B={cfg.batch_size}, Zipf({cfg.zipf_alpha}); {lookups / 1e6:.2f} M lookups per step\n")
    print("| path | K | budget | live | resident | read | fwd M/s | fwd x TBE | fwd ms best/med "
          "| step M/s | step x TBE | step ms best/med | peak RSS MB | prune % of T steps "
          "| meets #11.5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        res = r.result
        prune = f"{prune_pct(cfg, res):.3f}" if "prune_s" in res else ""
        meets = ""
        if r.path == "fiited":
            ok = tbe["step_s"] / res["step_s"] >= 1.0 and prune_pct(cfg, res) <= PRUNE_LIMIT_PCT
            meets = "yes" if ok else "no"
        live, resident, read = (f"{res[k]:.2f}" if k in res else ""
                                for k in ("live_fraction", "resident_fraction", "read_fraction"))
        print(f"| {r.path} | {r.K or ''} | {r.budget or ''} | {live} | {resident} | {read} "
              f"| {lookups / res['fwd_s'] / 1e6:.1f} | {tbe['fwd_s'] / res['fwd_s']:.2f} "
              f"| {1e3 * res['fwd_s']:.1f}/{1e3 * res['fwd_med_s']:.1f} "
              f"| {lookups / res['step_s'] / 1e6:.1f} | {tbe['step_s'] / res['step_s']:.2f} "
              f"| {1e3 * res['step_s']:.1f}/{1e3 * res['step_med_s']:.1f} "
              f"| {res['peak_rss_mb']:.0f} | {prune} | {meets} |")


def to_json(cfg: BenchConfig, results: Dict[int, Sequence[Row]]) -> Dict[str, Any]:
    """Every measurement, with the ratios to TBE and the acceptance check per FIITED row."""
    out: Dict[str, Any] = {"config": dataclasses.asdict(cfg), "torch": torch.__version__,
                           "threads": cfg.num_threads or torch.get_num_threads(), "rows": []}
    for L, rows in results.items():
        tbe = next(r.result for r in rows if r.path == "tbe")
        lookups = cfg.num_tables * cfg.batch_size * L
        for r in rows:
            res = dict(r.result)
            row: Dict[str, Any] = {"L": L, "path": r.path, "K": r.K, "budget": r.budget, **res,
                                   "fwd_x_tbe": tbe["fwd_s"] / res["fwd_s"],
                                   "step_x_tbe": tbe["step_s"] / res["step_s"],
                                   "step_lookups_per_s": lookups / res["step_s"]}
            if "prune_s" in res:
                row["prune_pct_of_interval"] = prune_pct(cfg, res)
            if r.path == "fiited":
                row["meets_acceptance"] = bool(row["step_x_tbe"] >= 1.0
                                               and row["prune_pct_of_interval"] <= PRUNE_LIMIT_PCT)
            out["rows"].append(row)
    return out


def profile(cfg: BenchConfig, L: int, K: int, budget: float, steps: int, top: int = 25) -> None:
    """Where a training step of the module goes, in this process: ``steps`` steps after the
    build, under torch.profiler (ops by self CPU time) and cProfile (Python functions by
    cumulative time). Shares of the step, not absolute times, are what to read on a shared
    machine."""
    import cProfile
    import io
    import pstats

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    zipf = ZipfIds(cfg)
    batches = [zipf.batch(L) for _ in range(cfg.num_batches)]
    ebc = build_fiited(cfg, K, budget, zipf, batches)
    kjts = [to_kjt(cfg, b) for b in batches]

    def step(i: int) -> None:
        ebc(kjts[i % len(kjts)]).values().backward(batches[i % len(batches)].grad)

    step(0)  # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    print(f"\n# torch.profiler: {steps} steps, L={L}, K={K}, budget={budget}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    for i in range(steps):
        step(i)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats("torchrec_fiited", top)
    print(f"# cProfile: {steps} steps, torchrec_fiited's functions by cumulative time")
    print(buf.getvalue())
    for i in range(cfg.cycle_gap):
        step(i)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pr = cProfile.Profile()
        pr.enable()
        ebc.prune()
        pr.disable()
    print(f"\n# torch.profiler: one pruning cycle after {cfg.cycle_gap} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats("torchrec_fiited", top)
    print("# cProfile: the cycle, torchrec_fiited's functions by cumulative time")
    print(buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--pooling-factors", nargs="+", type=int)
    parser.add_argument("--num-chunks", nargs="+", type=int)
    parser.add_argument("--budgets", nargs="+", type=float)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--num-tables", type=int)
    parser.add_argument("--num-embeddings", type=int)
    parser.add_argument("--mixed", action="store_true",
                        help="the hard preset's 26 tables of 10 to 10^6 rows (5.57M) instead of "
                             "equal tables")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--fill-steps", type=int)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every path in this process (smoke tests; peak RSS is shared)")
    parser.add_argument("--out", help="write every measurement as JSON here")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of the grid: profile STEPS module steps at the first L, K "
                             "and budget")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {"pooling_factors": args.pooling_factors, "num_chunks": args.num_chunks,
                 "budgets": args.budgets, "iterations": args.iterations,
                 "num_threads": args.threads, "num_tables": args.num_tables,
                 "num_embeddings": args.num_embeddings, "batch_size": args.batch_size,
                 "fill_steps": args.fill_steps}
    cfg = dataclasses.replace(cfg, **{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in overrides.items() if v})
    if args.mixed:
        from torchrec_fiited.data.clicklog import ClickLogConfig, clicklog_cardinalities

        rows = clicklog_cardinalities(ClickLogConfig(cardinality_scale=0.02 if args.quick else 1.0))
        cfg = dataclasses.replace(cfg, num_tables=len(rows), table_rows=tuple(rows))
    threads = cfg.num_threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; {cfg}")
    if args.profile:
        profile(cfg, cfg.pooling_factors[0], cfg.num_chunks[0], cfg.budgets[0], args.profile)
        return
    paths = ["tbe"] + [p for p in args.paths if p != "tbe"]
    results: Dict[int, List[Row]] = {}
    for L in cfg.pooling_factors:
        rows = []
        for path in paths:
            configs = ([(K, b) for K in cfg.num_chunks for b in cfg.budgets]
                       if path.startswith("fiited") else [(0, 0.0)])
            for K, budget in configs:
                rows.append(Row(path, K, budget,
                                measure(cfg, path, L, K, budget, args.in_process)))
        results[L] = rows
        report(cfg, L, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(to_json(cfg, results), f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
