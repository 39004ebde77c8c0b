"""Is this machine in its normal state? A 256 MB copy (bandwidth) and a gather of 4M random floats
from 256 MB (latency-bound, as the embedding kernels are), three times each.

The development VM has slow phases in which memory latency doubles (gather ~150 ms instead of
~75) for minutes, whatever runs: TBE's step on the 26 mixed tables then went from ~300 ms to
370-490 ms. Run this before and after a benchmark and read the benchmark only when both agree.

Usage::

    .venv/bin/python benchmarks/machine_probe.py
"""

import time

import torch


def main() -> None:
    a = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    idx = torch.randint(0, src.numel(), (4 << 20,), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        t = time.perf_counter()
        b.copy_(a)
        copy = time.perf_counter() - t
        t = time.perf_counter()
        src[idx].sum()
        gather = time.perf_counter() - t
        print(f"copy 256 MB {copy * 1e3:.1f} ms ({2 * a.numel() / copy / 1e9:.1f} GB/s)  "
              f"gather 4M random floats {gather * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
