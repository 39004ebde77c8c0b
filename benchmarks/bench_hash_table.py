"""Throughput of the resident-id hash table (store/hash_table.py), native vs reference ops.

Workload: a table of ``--slots`` slots (2^20 by default, W = ``--bucket-size``), first filled to
``--fill`` of its slots with distinct random keys; then batches of ``--batch`` keys drawn from
a Zipf(``--zipf``) distribution over ``--id-space`` ids (ranks scattered over int64 by an odd
multiplier), so a batch repeats its head ids and most of them are resident. Timed, per
implementation (best of ``--repeat`` runs of ``--iters`` batches, after one warm-up batch):

    lookup   ResidentHashTable.lookup of a batch.
    insert   ResidentHashTable.insert of a batch with random scores, on a copy of the filled
             table restored before each run (so each run starts from the same state).

Each prints M keys/s, ns per key and the load average (a shared machine slows timings down,
never up). ``--load-factor`` instead measures, for bucket sizes 8-128, the load factor at the
first refusal: distinct random keys inserted in batches of 1024 with equal scores (so a full
bucket refuses and never evicts), until a key is refused; the figure is the fraction of slots
resident after that batch (an upper bound within 1024 / slots); and the load factor when a
batch of 1024 first has 1% of its keys refused.

Usage::

    .venv/bin/python benchmarks/bench_hash_table.py
    .venv/bin/python benchmarks/bench_hash_table.py --load-factor --seeds 0 1 2
"""

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from torchrec_fiited.ops import dispatch, native
from torchrec_fiited.store.hash_table import ResidentHashTable


@dataclass(frozen=True)
class HashBenchConfig:
    """Knobs of the benchmark (see the module docstring).

    Args:
        slots: table capacity S.
        bucket_size: W.
        fill: fraction of the slots filled before timing.
        batch: keys per batch.
        zipf: exponent of the batch distribution.
        id_space: ids the batches draw from.
        iters: batches per timed run.
        repeat: timed runs per op; the fastest is reported.
        threads: torch threads (0 = torch's default).
        seed: RNG seed.
    """

    slots: int = 1 << 20
    bucket_size: int = 32
    fill: float = 0.7
    batch: int = 65536
    zipf: float = 1.05
    id_space: int = 10_000_000
    iters: int = 20
    repeat: int = 3
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1], got {self.fill}")


def spread(ranks: torch.Tensor) -> torch.Tensor:
    """Ranks int64 -> ids scattered over int64 (an odd multiplier is a bijection mod 2^64)."""
    return ranks * 0x9E3779B97F4A7C15 % (1 << 62) - (1 << 61)


def zipf_batch(cfg: HashBenchConfig, gen: torch.Generator) -> torch.Tensor:
    """Ids int64 [batch], rank r drawn with probability ~ r^-zipf (inverse-CDF table)."""
    ranks = torch.arange(1, cfg.id_space + 1, dtype=torch.float64)
    cdf = ranks.pow(-cfg.zipf).cumsum(0)
    u = torch.rand(cfg.batch, generator=gen, dtype=torch.float64) * cdf[-1]
    return spread(torch.searchsorted(cdf, u).clamp(max=cfg.id_space - 1))


def time_op(fn, iters: int, repeat: int) -> float:
    """Fastest seconds per call over ``repeat`` runs of ``iters`` calls (one warm-up call)."""
    fn(0)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(iters):
            fn(i)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def bench(cfg: HashBenchConfig, impl: str) -> Dict[str, float]:
    os.environ[dispatch.NATIVE_ENV] = "1" if impl == "native" else "0"
    gen = torch.Generator().manual_seed(cfg.seed)
    table = ResidentHashTable(cfg.slots // cfg.bucket_size, cfg.bucket_size)
    n_fill = int(cfg.fill * table.capacity)
    fill_keys = spread(torch.randperm(cfg.id_space, generator=gen)[:n_fill].long())
    table.insert(fill_keys, torch.rand(n_fill, generator=gen))
    batches = [zipf_batch(cfg, gen) for _ in range(cfg.iters)]
    scores = [torch.rand(cfg.batch, generator=gen) for _ in range(cfg.iters)]
    saved = table.keys.clone(), table.scores.clone()
    out = {"lookup": time_op(lambda i: table.lookup(batches[i]), cfg.iters, cfg.repeat)}

    def insert(i: int) -> None:
        if i == 0:
            table.keys.copy_(saved[0])
            table.scores.copy_(saved[1])
        table.insert(batches[i], scores[i])

    out["insert"] = time_op(insert, cfg.iters, cfg.repeat)
    return out


def load_factors(slots: int, bucket_size: int, seed: int) -> Tuple[float, float]:
    """Resident fraction after the first batch with a refusal, and after the first batch with
    at least 1% of its keys refused."""
    gen = torch.Generator().manual_seed(seed)
    table = ResidentHashTable(slots // bucket_size, bucket_size)
    keys = spread(torch.randperm(4 * slots, generator=gen).long())
    first = None
    for start in range(0, keys.numel(), 1024):
        batch = keys[start:start + 1024]
        refused = int((table.insert(batch, torch.zeros(batch.numel())).slots < 0).sum())
        if refused and first is None:
            first = table.num_resident() / table.capacity
        if refused >= 0.01 * batch.numel():
            return first, table.num_resident() / table.capacity
    raise RuntimeError("1% refusals not reached with 4x the capacity inserted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(HashBenchConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    parser.add_argument("--load-factor", action="store_true", help="measure the load factor")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    cfg = dataclasses.replace(HashBenchConfig(), **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(HashBenchConfig)
        if getattr(args, f.name) is not None})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"config: {cfg}; torch threads {torch.get_num_threads()}; load {os.getloadavg()}")
    if args.load_factor:
        for W in (8, 16, 32, 64, 128):
            figures = [load_factors(cfg.slots, W, s) for s in args.seeds]
            print(f"W={W:3d} (seeds {args.seeds}): load factor at the first refusal "
                  + ", ".join(f"{a:.3f}" for a, _ in figures) + " (B per resident id "
                  + ", ".join(f"{12 / a:.1f}" for a, _ in figures) + "); at 1% refused "
                  + ", ".join(f"{b:.3f}" for _, b in figures) + " ("
                  + ", ".join(f"{12 / b:.1f}" for _, b in figures) + ")")
        return
    impls = ["reference"] + (["native"] if "cpu" in native.HASH_DEVICES else [])
    for impl in impls:
        for op, sec in bench(cfg, impl).items():
            print(f"{impl:9s} {op:6s}: {cfg.batch / sec / 1e6:7.2f} M keys/s "
                  f"({sec / cfg.batch * 1e9:6.1f} ns/key); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
