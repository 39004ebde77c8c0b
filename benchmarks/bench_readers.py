"""Throughput and peak memory of the Criteo reader: TSV parse, cache loads, the old line parser.

Workload: a Criteo-format TSV written by this script, the same bytes for a seed. Each line
has a label (25% clicks), 13 integer counts (Pareto-tailed, 20% missing, 2% are -1) and 26
categoricals of 8 hex digits with the Criteo Kaggle cardinalities and missing rates, drawn
skewed (value index = cardinality * u**3, so a few values dominate each feature): about
249 bytes a line, as in Kaggle's train.txt (11.1 GB / 45.8M lines = 242).

Steps, each in a fresh child process (run one after another), so that its peak RSS
(``ru_maxrss``) is its own:

    parse   load_criteo with an empty cache: parse the TSV, write the cache, assign ids,
            map the arrays. The cold path.
    cached  load_criteo again: checks the cache and opens its memory maps (nothing read yet).
    read    load_criteo again, then copies every returned array into memory (reads all
            the cached bytes: what a training epoch touches).
    ids     load_criteo with other hash_sizes: parsed rows from the cache, ids assigned again.
    lines   the line-by-line parser (the old reader, now the slow path for blocks with a
            malformed line) on the first ``--baseline-lines`` lines.

Each step prints lines/s, MB/s of TSV text, CPU seconds (all threads: the parse uses
``READ_WORKERS`` parser threads) and its peak RSS, next to the RSS of the imports alone
(torch, torchrec, pyarrow: about 430 MB). Before each step the parent calls ``os.sync()``:
the writeback of the generated file and of earlier caches would otherwise run during
the step (on 2 cores it cost the 2 GB parse a third of its speed); the files stay in
the page cache, so every step reads from memory. The machine's load average is printed
with every step: on a shared machine other jobs slow the timings down, never up, so
``--repeat`` keeps the fastest run.

``--rss-check`` fails (exit 1) unless the parse step's peak RSS is below ``--rss-limit-gb``;
with ``--size-gb 2`` it is the 2 GB check of issue 10.

Usage::

    .venv/bin/python benchmarks/bench_readers.py                          # 1M lines, ~250 MB
    .venv/bin/python benchmarks/bench_readers.py --lines 200000 --steps parse cached
    .venv/bin/python benchmarks/bench_readers.py --rss-check --size-gb 2 --steps parse cached

Files go under ``--dir`` (default /tmp/bench_readers) and are deleted at the end unless
``--keep``.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

STEPS = ("parse", "cached", "read", "ids", "lines")
#: Criteo Kaggle cardinalities and (rounded) missing rates of C1..C26.
CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
                 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
MISSING_RATES = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.03, 0.03, 0.0, 0.0, 0.0,
                 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.0, 0.0, 0.03, 0.44, 0.03)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass(frozen=True)
class BenchConfig:
    """What to generate and measure.

    Args:
        lines: Lines of the generated file (ignored when ``size_gb`` is set).
        size_gb: Generate lines until the file has this many GiB.
        seed: Seed of the generated data.
        block_size: Bytes per parsed block (load_criteo's ``block_size``).
        repeat: Runs of each timed step; the fastest is reported.
        baseline_lines: Lines given to the line-by-line parser in the ``lines`` step.
        steps: Steps to run, in order.
        rss_check: Fail unless the parse step's peak RSS is below ``rss_limit_gb``.
        rss_limit_gb: The RSS limit in GiB.
        directory: Where the file and its cache are written.
        keep: Keep the file and the cache.
    """

    lines: int = 1_000_000
    size_gb: Optional[float] = None
    seed: int = 0
    block_size: int = 8 << 20
    repeat: int = 1
    baseline_lines: int = 100_000
    steps: tuple[str, ...] = ("parse", "cached", "read", "ids", "lines")
    rss_check: bool = False
    rss_limit_gb: float = 1.0
    directory: str = "/tmp/bench_readers"
    keep: bool = False

    def __post_init__(self) -> None:
        for name in ("lines", "block_size", "repeat", "baseline_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size_gb is not None and not self.size_gb > 0:
            raise ValueError(f"size_gb must be > 0, got {self.size_gb}")
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
        if self.rss_check and "parse" not in self.steps:
            raise ValueError("--rss-check measures the parse step: add 'parse' to --steps")

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "day_0.tsv")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.directory, "cache")


# ---- data -----------------------------------------------------------------------------------


def _hex8(values: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 8]`` lowercase hex digits of uint32 values."""
    out = np.empty((values.size, 8), dtype=np.uint8)
    for j in range(8):
        out[:, j] = _HEX[(values >> np.uint32(4 * (7 - j))) & np.uint32(15)]
    return out


def _chunk(rng: np.random.Generator, n: int):
    """n Criteo lines as a pyarrow table (nulls and empty strings are written as empty fields)."""
    import pyarrow as pa

    cols: dict[str, Any] = {"label": pa.array((rng.random(n) < 0.25).astype(np.int8))}
    for i in range(13):
        counts = np.floor(rng.pareto(1.2, n) * (3 + 10 * i)).astype(np.int64)
        counts[rng.random(n) < 0.02] = -1
        cols[f"I{i + 1}"] = pa.array(counts, mask=rng.random(n) < 0.2)
    for f, (card, missing) in enumerate(zip(CARDINALITIES, MISSING_RATES)):
        index = np.minimum((card * rng.random(n) ** 3).astype(np.int64), card - 1)
        token = ((index * 2654435761 + f * 97) & 0xFFFFFFFF).astype(np.uint32)
        absent = rng.random(n) < missing
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.where(absent, 0, 8), out=offsets[1:])
        data = _hex8(token[~absent]).reshape(-1)
        cols[f"C{f + 1}"] = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets),
                                                                   pa.py_buffer(data)])
    return pa.table(cols)


def generate(cfg: BenchConfig) -> tuple[int, int]:
    """Writes the TSV file; returns ``(lines, bytes)``."""
    import pyarrow.csv as pacsv

    os.makedirs(cfg.directory, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    target = None if cfg.size_gb is None else int(cfg.size_gb * 2**30)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    done = 0
    with pacsv.CSVWriter(cfg.path, _chunk(rng, 1).schema, write_options=options) as writer:
        while True:
            n = 250_000 if target is not None else min(250_000, cfg.lines - done)
            if n <= 0 or (target is not None and os.path.getsize(cfg.path) >= target):
                break
            writer.write_table(_chunk(rng, n))
            done += n
    return done, os.path.getsize(cfg.path)


# ---- steps (child processes) ----------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _materialize(loaded) -> int:
    """Copies every array of a load into memory; returns the bytes read."""
    train, test, _ = loaded
    return sum(np.array(getattr(part, field)).nbytes for part in (train, test)
               for field in ("labels", "dense", "sparse"))


def run_step(step: str, cfg: BenchConfig) -> dict[str, Any]:
    """Runs one step in this process and returns its measurements."""
    from torchrec_fiited.data.blocks import parse_block_lines
    from torchrec_fiited.data.criteo import CriteoFormat, load_criteo

    import_rss = _peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    options = dict(cache_dir=cfg.cache_dir, progress=False, block_size=cfg.block_size)
    nbytes = os.path.getsize(cfg.path)
    if step == "lines":
        with open(cfg.path, "rb") as fh:
            raw = b"".join(fh.readline() for _ in range(cfg.baseline_lines))
        start, cpu = time.perf_counter(), time.process_time()
        rows = len(parse_block_lines(CriteoFormat(), raw)[0])
        nbytes = len(raw)
    else:
        hash_sizes = 2**19 if step == "ids" else 2**20
        loaded = load_criteo(cfg.path, hash_sizes=hash_sizes, **options)
        rows = len(loaded[0]) + len(loaded[1])
        if step == "read":
            _materialize(loaded)
    seconds = time.perf_counter() - start
    return {"step": step, "rows": rows, "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu, "lines_per_s": rows / seconds,
            "mb_per_s": nbytes / seconds / 1e6, "peak_rss_mb": _peak_rss_mb(),
            "import_rss_mb": import_rss}


def _child(step: str, cfg: BenchConfig) -> dict[str, Any]:
    """Runs a step in a fresh Python process."""
    if step == "parse":
        shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    elif step == "ids":  # drop the other id sets so that ids are assigned again
        for name in os.listdir(cfg.cache_dir):
            if ".ids-" in name:
                shutil.rmtree(os.path.join(cfg.cache_dir, name))
    # Flush the dirty pages of earlier steps (the generated file, the cache) first: their
    # writeback would otherwise compete with the step for the CPUs. The files stay cached.
    os.sync()
    out = subprocess.run([sys.executable, __file__, "--child", step, "--config",
                          json.dumps(asdict(cfg))], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_avg"] = os.getloadavg()
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"{result['step']:7s} {result['rows']:>11,d} lines {result['seconds']:8.3f} s "
          f"{result['lines_per_s']:>13,.0f} lines/s {result['mb_per_s']:8.1f} MB/s  "
          f"cpu {result['cpu_seconds']:6.2f} s  peak RSS {result['peak_rss_mb']:6.0f} MB "
          f"(imports {result['import_rss_mb']:.0f})  load {result['load_avg'][0]:.2f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=BenchConfig.lines)
    parser.add_argument("--size-gb", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=BenchConfig.block_size)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--baseline-lines", type=int, default=BenchConfig.baseline_lines)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(BenchConfig.steps))
    parser.add_argument("--rss-check", action="store_true")
    parser.add_argument("--rss-limit-gb", type=float, default=1.0)
    parser.add_argument("--dir", default=BenchConfig.directory)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config = json.loads(args.config)
        config["steps"] = tuple(config["steps"])
        print(json.dumps(run_step(args.child, BenchConfig(**config))))
        return
    cfg = BenchConfig(lines=args.lines, size_gb=args.size_gb, seed=args.seed,
                      block_size=args.block_size, repeat=args.repeat,
                      baseline_lines=args.baseline_lines, steps=tuple(args.steps),
                      rss_check=args.rss_check, rss_limit_gb=args.rss_limit_gb,
                      directory=args.dir, keep=args.keep)
    sys.exit(run(cfg))


def run(cfg: BenchConfig) -> int:
    """Generates the file, runs the steps, prints them; returns the exit status."""
    start = time.perf_counter()
    lines, nbytes = generate(cfg)
    print(f"generated {cfg.path}: {lines:,d} lines, {nbytes / 1e6:,.0f} MB in "
          f"{time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    status = 0
    try:
        for step in cfg.steps:
            results = [_child(step, cfg) for _ in range(cfg.repeat)]
            best = min(results, key=lambda r: r["seconds"])
            _print(best)
            if step == "parse" and cfg.rss_check:
                peak = max(r["peak_rss_mb"] for r in results)
                ok = peak < cfg.rss_limit_gb * 1024
                print(f"rss check: parse peak RSS {peak:.0f} MB "
                      f"{'<' if ok else '>='} {cfg.rss_limit_gb * 1024:.0f} MB: "
                      f"{'PASS' if ok else 'FAIL'}", flush=True)
                status = status or (0 if ok else 1)
    finally:
        if not cfg.keep:
            shutil.rmtree(cfg.directory, ignore_errors=True)
    return status


if __name__ == "__main__":
    main()
