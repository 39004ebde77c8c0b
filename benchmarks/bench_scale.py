"""Scale: a FIITED collection whose dense form would not fit in memory trains at its budget.

Issue 11, acceptance 2: 4 tables x num_embeddings = 10^9 x D=64 (1.04 TB dense with rowwise
Adagrad state) at budget 1e-4, 200 training steps of Zipf(1.05) ids with batch 8192: the
collection builds, trains (pruning cycles included) and its peak RSS above the process's
baseline stays at most 2x the budget bytes.

Model: ``FiitedEmbeddingBagCollection`` (rowwise Adagrad fused into backward, one feature per
table, one id per bag) -> a dense linear head [T * D, 1] (torch SGD) -> loss mean((y - t)^2)
against fixed random targets. A pruning cycle runs every ``--prune-interval`` steps.

Ids: per table, ranks r in [0, E) from a truncated continuous power law P(r) ~ (r + 1)^-alpha
(inverse CDF in float64, so no per-id table), mapped to ids by an affine bijection of [0, E)
keyed by (seed, table), so the hot ids are spread over the id space rather than 0..n. Each step
draws its batch from a generator seeded by (seed, step): nothing is kept between steps.

Memory: the baseline is the RSS after the imports, one batch drawn and one forward/backward of
the dense head alone (so the allocator and torch's lazy state are warm); the peak high-water
mark is reset there (``/proc/self/clear_refs`` 5, Linux >= 4.0; else ``ru_maxrss`` and the
baseline is the earlier peak) and read after building and after training. Peak RSS is not
distorted by other processes on the machine; the steps/s figure is.

``--malloc-mmap-threshold 131072`` fixes glibc's mmap threshold, so that freed tensors leave
RSS at once (by default glibc keeps up to 32 MiB blocks in its heap after a large free, and RSS
then includes freed temporaries). ``--mem-lines N`` profiles the last N steps line by line
(which line of the store's code holds the memory at the peak; slow, the module's steps only).

Measured (store v2 at 2bad8c4 and the working tree just before it, 2 shared cores; RSS only, no
times taken): budget bytes 104.0 MB = module tensor bytes (chunks 62.0, optimizer 3.9, free
stacks 3.9, entries 29.1, sketch 5.2); peak above baseline after build 103.8 MB, after 200
steps with 4 cycles 193.9-199.3 MB (1.86-1.92x over 3 runs, PASS) with glibc's default,
174.8 MB (1.68x) with the mmap threshold fixed at 128 KiB. The peak is the pruning cycle: a
step alone peaks at ~130-137 MB (the batch's [8192, 256] gradient and output, 8.4 MB each, and
the lookups' tensors); the cycle adds ~50 MB of whole-pool temporaries at 605k resident
entries (``--mem-lines 2``: apply_decision 48.9 MB, of which the decayed utilities 26.5 MB;
the sample's counter_uniform over every resident key 19.2 MB).

Usage::

    .venv/bin/python benchmarks/bench_scale.py --out scale.json          # the acceptance run
    .venv/bin/python benchmarks/bench_scale.py --rows 1000000 --budget 0.01 --steps 10 \\
        --batch 1024 --prune-interval 5                                    # small
    .venv/bin/python benchmarks/bench_scale.py --malloc-mmap-threshold 131072 --mem-lines 2
"""

import argparse
import json
import math
import resource
import sys
import time
from typing import Any, Dict, List, Optional

import torch


# ---- memory ------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class PeakRSS:
    """Peak resident bytes since ``reset``, in bytes.

    With ``clear_refs`` the kernel's high-water mark (VmHWM) restarts at the current RSS; without
    it, ``ru_maxrss`` keeps the process's whole-life peak and the baseline is that peak.
    """

    def __init__(self) -> None:
        self.exact = False

    def reset(self) -> int:
        """Restart the high-water mark; returns the baseline (bytes)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
            return _status_kib("VmRSS") * 1024
        except OSError:
            self.exact = False
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def current() -> int:
        return _status_kib("VmRSS") * 1024


def fix_malloc_mmap_threshold(threshold: int) -> bool:
    """glibc: serve allocations >= ``threshold`` bytes by mmap and return them to the system on
    free (mallopt M_MMAP_THRESHOLD, which also turns off the dynamic threshold). By default glibc
    raises the threshold up to 32 MiB after freeing a large block and then serves such blocks
    from its heap, whose freed memory stays resident: RSS then includes freed tensors. With a
    fixed threshold RSS follows the live tensors. Returns False where mallopt is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


class LineMemoryProfile:
    """Peak RSS per source line of chosen functions (``sys.settrace``), for finding which
    allocation makes a peak.

    At every line event of a traced function the kernel's high-water mark is read and reset, so
    the peak of the interval since the last event is known; every traced frame on the stack
    folds it into the line it is executing. A line's entry is (peak RSS while it ran, RSS when it
    started): their difference is what the line (with its callees) allocated at its peak. Run
    with ``fix_malloc_mmap_threshold`` so RSS follows live tensors. Python-level overhead only.
    """

    def __init__(self, functions) -> None:
        self.codes = {f.__code__ for f in functions}
        self.stack: List[list] = []  # [frame, lineno, rss_at_line_start, peak_since]
        self.lines: Dict[tuple, Dict[str, int]] = {}
        self.max_hwm = 0  # the peak over every interval it read (it resets the kernel's mark)

    @staticmethod
    def _read() -> tuple:
        with open("/proc/self/status") as f:
            vals = {line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in f if line.startswith(("VmRSS:", "VmHWM:"))}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vals["VmRSS"], vals["VmHWM"]

    def _event(self) -> int:
        rss, hwm = self._read()
        self.max_hwm = max(self.max_hwm, hwm)
        for entry in self.stack:
            entry[3] = max(entry[3], hwm)
        return rss

    def _close_line(self, entry: list) -> None:
        if entry[1] is None:
            return
        code = entry[0].f_code
        key = (code.co_filename, entry[1], code.co_name)
        rec = self.lines.setdefault(key, {"peak": 0, "above_start": 0, "hits": 0})
        rec["peak"] = max(rec["peak"], entry[3])
        rec["above_start"] = max(rec["above_start"], entry[3] - entry[2])
        rec["hits"] += 1

    def _local(self, frame, event, arg):
        if event in ("line", "return"):
            rss = self._event()
            entry = next(e for e in reversed(self.stack) if e[0] is frame)
            self._close_line(entry)
            if event == "line":
                entry[1], entry[2], entry[3] = frame.f_lineno, rss, rss
            else:
                self.stack.remove(entry)
        return self._local

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            rss = self._event()
            self.stack.append([frame, None, rss, rss])
            return self._local
        return None

    def __enter__(self) -> "LineMemoryProfile":
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def report(self, base: int, top: int = 25) -> List[Dict[str, Any]]:
        import linecache

        rows = []
        for (path, line, name), rec in self.lines.items():
            rows.append({"function": name, "file": path.split("torchrec_fiited/")[-1],
                         "line": line, "source": linecache.getline(path, line).strip(),
                         "peak_above_baseline": rec["peak"] - base,
                         "allocated_at_peak": rec["above_start"], "hits": rec["hits"]})
        rows.sort(key=lambda r: -r["allocated_at_peak"])
        return rows[:top]


def traced_functions() -> list:
    """The store's training and cycle code paths, for ``LineMemoryProfile``."""
    from torchrec_fiited.modules import batch, fiited_ebc, pruning
    from torchrec_fiited.policy import cycle, utility
    from torchrec_fiited.store import sketch, vhpi

    E = fiited_ebc.FiitedEmbeddingBagCollection
    S = vhpi.VHPIStore
    return [
        fiited_ebc._store_lookup, E._resolve, E._resolve_entries, E._pooled,
        E._apply_gradients, E._end_step, batch.resolve_pool, batch.PoolBatch.bag_of_id,
        S.admit, S.allocate, S.evict, S.erase, S._release, S.init_values,
        sketch.UtilitySketch.add, sketch.UtilitySketch.estimate,
        utility.missed_gains,
        pruning.run_cycle, cycle.sample_pool, cycle.apply_decision, cycle.merge_samples,
    ]


# ---- ids ---------------------------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64's finalizer on a Python int (for the permutation's keys)."""
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


class ZipfIds:
    """Zipf(alpha) ids over [0, E) for each of T tables, without any per-id state.

    rank = round(x) - 1 for x drawn from the continuous power law on [0.5, E + 0.5) with density
    ~ x^-alpha (inverse CDF; the midpoint rule gives rank 0 mass within ~10% of discrete Zipf's,
    later ranks closer); id = (a_t * rank + b_t) mod E with gcd(a_t, E) = 1, a bijection
    of [0, E) per table. a_t < 2^62 / E keeps the product inside int64.
    """

    def __init__(self, num_rows: int, num_tables: int, alpha: float, seed: int) -> None:
        if alpha <= 0 or alpha == 1.0:
            raise ValueError(f"zipf alpha must be > 0 and != 1, got {alpha}")
        if num_rows >= 1 << 48:
            raise ValueError(f"rows must be < 2^48 for the affine permutation, got {num_rows}")
        self.E, self.alpha, self.seed = num_rows, alpha, seed
        self.one_minus = 1.0 - alpha
        self.lo = 0.5**self.one_minus
        self.hi = (num_rows + 0.5) ** self.one_minus
        limit = max(2, min((1 << 62) // max(1, num_rows), 1 << 40))
        self.affine = []
        for t in range(num_tables):
            a = _mix(seed * 1000003 + 2 * t + 1) % limit | 1
            while math.gcd(a, num_rows) != 1:
                a = (a + 2) % limit | 1
            b = _mix(seed * 1000003 + 2 * t + 2) % num_rows
            self.affine.append((a, b))

    def ranks(self, n: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        # F(x) = (lo - x^(1-a)) / (lo - hi) on [0.5, E + 0.5), lo = 0.5^(1-a), hi = (E+.5)^(1-a).
        x = torch.pow(self.lo - u * (self.lo - self.hi), 1.0 / self.one_minus)
        return (x.round().to(torch.int64) - 1).clamp_(0, self.E - 1)

    def batch(self, step: int, batch_size: int) -> List[torch.Tensor]:
        """Ids int64 [batch_size] per table for ``step`` (the same for the same seed and step)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = []
        for a, b in self.affine:
            r = self.ranks(batch_size, gen)
            out.append(torch.remainder(r * a + b, self.E))
        return out


# ---- run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
    from torchrec_fiited.store.sizing import full_table_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    T, E, D, B = args.tables, args.rows, args.dim, args.batch
    keys = [f"f{t}" for t in range(T)]
    zipf = ZipfIds(E, T, args.alpha, args.seed)
    lengths = torch.ones(T * B, dtype=torch.int64)

    def kjt(step: int) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(zipf.batch(step, B)), lengths)

    head = torch.nn.Linear(T * D, 1)
    head_opt = torch.optim.SGD(head.parameters(), lr=args.lr)
    target = torch.randn(B, 1, generator=torch.Generator().manual_seed(args.seed))

    def loss_of(pooled: torch.Tensor) -> torch.Tensor:
        return (head(pooled) - target).pow(2).mean()

    mmap_fixed = bool(args.malloc_mmap_threshold) and fix_malloc_mmap_threshold(
        args.malloc_mmap_threshold)
    # Warm the allocator and torch's lazy state with everything but the collection.
    kjt(-1)
    loss_of(torch.zeros(B, T * D, requires_grad=True)).backward()
    head_opt.zero_grad(set_to_none=True)

    rss = PeakRSS()
    base = rss.reset()

    tables = [
        EmbeddingBagConfig(name=f"t{t}", embedding_dim=D, num_embeddings=E, feature_names=[keys[t]])
        for t in range(T)
    ]
    config = FiitedConfig(
        num_chunks=args.num_chunks, budget=args.budget, prune_interval=args.prune_interval,
        optimizer="rowwise_adagrad", learning_rate=args.lr, seed=args.seed,
    )
    t0 = time.perf_counter()
    ebc = FiitedEmbeddingBagCollection(tables, config)
    build_s = time.perf_counter() - t0
    peak_build = rss.peak()
    full_bytes = sum(full_table_bytes(E, D, config.optimizer) for _ in range(T))
    budget_bytes = args.budget * full_bytes
    module_bytes = ebc.stats()["bytes"]["total"]

    trace: List[Dict[str, Any]] = []
    cycles = 0
    lines = LineMemoryProfile(traced_functions()) if args.mem_lines else None
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = kjt(step)
        profiled = lines is not None and step >= args.steps - args.mem_lines
        if profiled:
            lines.__enter__()
        loss = loss_of(ebc(batch).values())
        loss.backward()  # the collection's update (and its pruning cycle, when due) runs here
        if profiled:
            lines.__exit__()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
        ebc.fused_optimizer.step()  # a no-op: the fused update ran in backward
        done = int(ebc.steps_done)
        is_cycle = args.prune_interval > 0 and done % args.prune_interval == 0
        cycles += is_cycle
        traced = bool(args.trace_every) and done % args.trace_every == 0
        if is_cycle or step == args.steps - 1 or traced:
            peak = max(rss.peak(), lines.max_hwm if lines is not None else 0)
            trace.append({"step": done, "cycle": bool(is_cycle), "loss": float(loss.detach()),
                          "rss_above_base": PeakRSS.current() - base,
                          "peak_above_base": peak - base})
    train_s = time.perf_counter() - t0
    peak_train = max(rss.peak(), lines.max_hwm if lines is not None else 0)

    stats = ebc.stats()
    pools = {
        name: {k: p[k] for k in ("capacity", "entry_capacity", "resident_entries", "sketch_width",
                                 "free_slots", "live_per_chunk")}
        for name, p in stats["pools"].items()
    }
    for name, p in stats["pools"].items():
        last = p.get("last_cycle") or {}
        pools[name]["last_cycle"] = {k: last.get(k) for k in ("step", "churn", "enforced",
                                                              "num_seen", "num_sampled")}
    peak_above = peak_train - base
    ratio = peak_above / budget_bytes
    return {
        "config": {"tables": T, "rows": E, "dim": D, "num_chunks": args.num_chunks,
                   "budget": args.budget, "steps": args.steps, "batch": B, "alpha": args.alpha,
                   "prune_interval": args.prune_interval, "seed": args.seed,
                   "threads": torch.get_num_threads()},
        "full_bytes": full_bytes,
        "budget_bytes": budget_bytes,
        "module_bytes": module_bytes,
        "bytes": stats["bytes"],
        "pools": pools,
        "baseline_rss": base,
        "rss_measure": "VmHWM after clear_refs" if rss.exact else "ru_maxrss (whole life)",
        "peak_above_baseline_build": peak_build - base,
        "peak_above_baseline": peak_above,
        "ratio_to_budget": ratio,
        "max_ratio": args.max_ratio,
        "pass": bool(ratio <= args.max_ratio),
        "malloc_mmap_threshold": args.malloc_mmap_threshold if mmap_fixed else None,
        "cycles": cycles,
        "mem_lines": lines.report(base) if lines is not None else None,
        "build_s": build_s,
        "train_s": train_s,
        "steps_per_s": args.steps / train_s if train_s > 0 else float("nan"),
        "final_loss": trace[-1]["loss"] if trace else None,
        "trace": trace,
    }


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def report(r: Dict[str, Any]) -> None:
    c = r["config"]
    print(f"{c['tables']} tables x {c['rows']:,} rows x D={c['dim']}, K={c['num_chunks']}, "
          f"budget {c['budget']:g}: full {r['full_bytes'] / 1e12:.3f} TB, budget "
          f"{_mb(r['budget_bytes'])} MB; {c['steps']} steps of batch {c['batch']}, "
          f"Zipf({c['alpha']}), cycle every {c['prune_interval']} steps ({r['cycles']} cycles)")
    print("\n| component | MB |\n|---|---:|")
    for k, v in r["bytes"].items():
        print(f"| {k} | {_mb(v)} |")
    print("\n| measure | value |\n|---|---:|")
    rows = [
        ("budget bytes (MB)", _mb(r["budget_bytes"])),
        ("module tensor bytes (MB)", _mb(r["module_bytes"])),
        ("baseline RSS (MB)", _mb(r["baseline_rss"])),
        ("peak RSS above baseline after build (MB)", _mb(r["peak_above_baseline_build"])),
        ("peak RSS above baseline after training (MB)", _mb(r["peak_above_baseline"])),
        ("ratio to budget bytes", f"{r['ratio_to_budget']:.3f}"),
        (f"pass (<= {r['max_ratio']:g}x)", "PASS" if r["pass"] else "FAIL"),
        ("steps/s (shared machine: indicative)", f"{r['steps_per_s']:.2f}"),
        ("RSS measure", r["rss_measure"]),
        ("glibc mmap threshold", r["malloc_mmap_threshold"] or "dynamic (default)"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    for name, p in r["pools"].items():
        print(f"\npool {name}: {p}")
    if r["mem_lines"]:
        print("\nlines by RSS they allocated at their peak (MB; profiled steps only):\n")
        print("| MB allocated | MB peak above baseline | hits | where | source |")
        print("|---:|---:|---:|---|---|")
        for x in r["mem_lines"]:
            print(f"| {_mb(x['allocated_at_peak'])} | {_mb(x['peak_above_baseline'])} "
                  f"| {x['hits']} | {x['file']}:{x['line']} {x['function']} | `{x['source']}` |")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=10**9, help="num_embeddings per table")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-chunks", type=int, default=4)
    p.add_argument("--budget", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent")
    p.add_argument("--prune-interval", type=int, default=50, help="steps between cycles (0: none)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch default)")
    p.add_argument("--max-ratio", type=float, default=2.0,
                   help="pass if peak RSS above baseline <= this x budget bytes")
    p.add_argument("--trace-every", type=int, default=0, help="also record RSS every N steps")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="fix glibc's mmap threshold (e.g. 131072) so RSS follows live tensors "
                        "(default: glibc's dynamic threshold)")
    p.add_argument("--mem-lines", type=int, default=0, metavar="STEPS",
                   help="profile the last STEPS steps line by line: which line of the store's "
                        "code makes the RSS peak (slow; use with --malloc-mmap-threshold)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    for name in ("tables", "rows", "dim", "num_chunks", "steps", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.budget <= 1:
        p.error("--budget must be in (0, 1]")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    r = run(args)
    report(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0 if r["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
