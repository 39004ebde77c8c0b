"""Achieved bandwidth of the native CUDA ops, against the GPU's own copy bandwidth and torch's
``embedding_bag``, all measured in the same run (issue 12, acceptance 4). Needs torch alone, so
it runs on the device machine, which has neither torchrec nor fbgemm (``benchmarks/device_check.sh``
builds the ops there and runs it).

Workload (defaults, the bench_lookup grid's shape at GPU scale): one pool shared by F=8 tables
of 1M resident rows each (8M entries), D=64 in K=4 chunks of 16 floats, half the chunks live
(a budget-0.5 pool: 16M chunk slots, 1 GiB of weights), batch 8192, pooling factor L=20
(1.3M ids a step), Zipf(1.05) ids; SGD or (``--optimizer adagrad``) elementwise Adagrad, the
same rule on both sides (torch's sparse SGD / Adagrad for the baseline).

Measured (CUDA events; the median of ``--iterations`` after ``--warmup``):
    copy        ``dst.copy_(src)`` of 2 GiB: the GPU's practical peak, bytes read + written.
    forward     ``fiited::lookup_forward_batched_out``: all F features in one call.
    backward    ``fiited::fused_backward`` over the same ids (dedupe, utilities, the optimizer on
                live chunks).
    embbag fwd  ``F.embedding_bag`` (sum) over a dense [8M, 64] table with the same ids.
    embbag step its forward + backward (sparse grad) + a ``torch.optim.SGD`` / ``Adagrad`` step.
    hash probe  ``fiited::hash_lookup`` of the step's keys in a table holding the 8M entries.

Bytes are a model of what each op must move (stated per op below; hot rows served from L2 count
as if read from memory, as FBGEMM's "effective bandwidth" does), so a figure above the copy
bandwidth means the cache is doing part of the work. The ratios are what the issue asks for:
forward and step against the copy peak and against embedding_bag on the same GPU.

Usage::

    python3 benchmarks/bench_cuda_ops.py --out cuda_ops.json          # on a GPU
    python3 benchmarks/bench_cuda_ops.py --device cpu --rows 20000    # smoke test of the script
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from torchrec_fiited.ops import dispatch, native
from torchrec_fiited.ops.reference import FusedParams
from torchrec_fiited.store.hash_table import ResidentHashTable


@dataclass
class Workload:
    tables: int = 8
    rows: int = 1_000_000  # resident rows (entries) per table
    dim: int = 64
    chunks: int = 4
    live: float = 0.5  # fraction of chunks holding a slot
    batch: int = 8192
    pooling: int = 20
    zipf: float = 1.05
    seed: int = 0


def zipf_ids(n: int, rows: int, a: float, gen: torch.Generator) -> torch.Tensor:
    """n ids in [0, rows), P(rank r) ~ r^-a, ranks scattered over the rows by a permutation."""
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    probs = ranks.pow(-a)
    drawn = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return torch.randperm(rows, generator=gen)[drawn]


def build(w: Workload, device: torch.device) -> Dict[str, torch.Tensor]:
    """The pool, its entries' chunk slots, one batch (entries, offsets) and its gradient."""
    gen = torch.Generator().manual_seed(w.seed)
    E, K, cs = w.tables * w.rows, w.chunks, w.dim // w.chunks
    live = torch.rand(E, K, generator=gen) < w.live
    n_live = int(live.sum())
    slots = torch.full((E, K), -1, dtype=torch.int32)
    slots[live] = torch.randperm(n_live, generator=gen).to(torch.int32)
    ids = torch.cat([zipf_ids(w.batch * w.pooling, w.rows, w.zipf, gen) + t * w.rows
                     for t in range(w.tables)])
    bags = w.tables * w.batch
    offsets = torch.arange(0, bags + 1, dtype=torch.int64) * w.pooling
    data = {
        "weights": torch.randn(n_live, cs, generator=gen) * 0.01,
        "chunk_slots": slots,
        "utilities": torch.zeros(E, K),
        "entries": ids,
        "offsets": offsets,
        # Bag j = f * B + b reads gradient row b * F + f: the [B, F * D] output gradient viewed
        # as [B * F, D] (the module's in-place layout).
        "row_of_id": (torch.arange(bags) % w.batch * w.tables
                      + torch.arange(bags) // w.batch).repeat_interleave(w.pooling),
        "grad": torch.randn(w.batch, w.tables * w.dim, generator=gen),
        "dense": torch.randn(E, w.dim, generator=gen) * 0.01,
    }
    return {k: v.to(device) for k, v in data.items()}


def timed(fn: Callable[[], None], device: torch.device, warmup: int, iterations: int) -> float:
    """Median seconds of ``fn`` over ``iterations`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(w: Workload, device: torch.device, warmup: int, iterations: int,
        optimizer: str = "sgd") -> Dict[str, Dict]:
    d = build(w, device)
    K, cs, D = w.chunks, w.dim // w.chunks, w.dim
    n, bags = d["entries"].numel(), d["offsets"].numel() - 1
    live_read = int((d["chunk_slots"][d["entries"]] >= 0).sum())  # chunks gathered by forward
    uniq = torch.unique(d["entries"])
    live_touched = int((d["chunk_slots"][uniq] >= 0).sum())
    results: Dict[str, Dict] = {}

    def record(name: str, seconds: float, nbytes: int, model: str) -> None:
        results[name] = {"ms": seconds * 1e3, "bytes": nbytes, "GBps": nbytes / seconds / 1e9,
                         "bytes_model": model}

    # The copy peak: 2 GiB (smaller on the CPU smoke test) read and written.
    numel = (1 << 29) if device.type == "cuda" else (1 << 22)
    src, dst = torch.empty(numel, device=device), torch.empty(numel, device=device)
    record("copy", timed(lambda: dst.copy_(src), device, warmup, iterations), 2 * 4 * numel,
           "read + write of the buffer")
    del src, dst

    out = torch.empty(w.batch, w.tables * D, device=device)
    cols = torch.arange(w.tables, device=device) * D
    means = torch.zeros(w.tables, dtype=torch.bool, device=device)
    # Per feature, its B bags in the op's layout: the f-th block of B bags is feature f.
    forward = lambda: dispatch.lookup_forward_batched(  # noqa: E731
        d["weights"], d["chunk_slots"], d["entries"], d["offsets"], None, cols, means, out)
    record("forward", timed(forward, device, warmup, iterations),
           n * (8 + 4 * K) + live_read * cs * 4 + (bags + 1) * 8 + out.numel() * 4,
           "per id: entry (8 B), K slots (4 B), live chunks read; offsets; output written")

    params = FusedParams(optimizer, 0.01, 1e-8, 0.0, "grad_access", 0.99, 1)
    # Adagrad's state: one fp32 per stored float, read and written with the weights.
    momentum = (torch.zeros_like(d["weights"]) if optimizer == "adagrad"
                else torch.zeros(0, device=device))
    state = 2 if optimizer == "adagrad" else 1
    grad_rows = d["grad"].view(-1, D)
    backward = lambda: dispatch.fused_backward(  # noqa: E731
        grad_rows, d["row_of_id"], None, d["entries"], d["chunk_slots"], d["utilities"],
        d["weights"], momentum, params)
    record("backward", timed(backward, device, warmup, iterations),
           n * (8 + 8 + D * 4) + uniq.numel() * K * (4 + 8) + live_touched * cs * 4 * 2 * state,
           "per id: entry, bag row, gradient row; per touched entry: K slots, K utilities read "
           "and written; live chunks (and their Adagrad state) read and written")

    dense = d["dense"].clone().requires_grad_(True)
    opt = (torch.optim.Adagrad([dense], lr=0.01, eps=1e-8) if optimizer == "adagrad"
           else torch.optim.SGD([dense], lr=0.01))
    emb_fwd = lambda: F.embedding_bag(d["entries"], dense, d["offsets"][:-1], mode="sum")  # noqa: E731
    dense_fwd_bytes = n * (8 + D * 4) + bags * 8 + bags * D * 4
    record("embbag_forward", timed(lambda: emb_fwd(), device, warmup, iterations),
           dense_fwd_bytes, "per id: index, row read; offsets; output written")

    def emb_step() -> None:
        pooled = F.embedding_bag(d["entries"], dense, d["offsets"][:-1], mode="sum", sparse=True)
        pooled.backward(d["grad"].view(w.batch, w.tables, D).transpose(0, 1).reshape(bags, D))
        opt.step()
        opt.zero_grad(set_to_none=True)

    record("embbag_step", timed(emb_step, device, warmup, iterations),
           dense_fwd_bytes + n * (8 + D * 4) + uniq.numel() * D * 4 * 2 * state,
           "forward; per id: index, gradient row; per touched row (and its state): read and written")

    table = ResidentHashTable(max(1, int(w.tables * w.rows * 1.25) // 32), 32, device=device)
    keys = torch.arange(w.tables * w.rows, device=device, dtype=torch.int64)
    for part in keys.split(1 << 20):
        table.insert(part, torch.ones(part.numel(), device=device))
    probe_keys = d["entries"].clone()
    slots = torch.empty_like(probe_keys)
    probe = lambda: dispatch.hash_lookup(table.keys, 32, probe_keys, -1, out=slots)  # noqa: E731
    record("hash_probe", timed(probe, device, warmup, iterations), n * (8 + 8 + 64),
           "per key: key read, slot written, one 64 B line of its bucket")
    results["hash_probe"]["Mkeys_per_s"] = n / (results["hash_probe"]["ms"] / 1e3) / 1e6

    peak = results["copy"]["GBps"]
    results["ratios"] = {
        "forward_vs_copy_bandwidth": results["forward"]["GBps"] / peak,
        "backward_vs_copy_bandwidth": results["backward"]["GBps"] / peak,
        "forward_speed_vs_embbag": results["embbag_forward"]["ms"] / results["forward"]["ms"],
        "step_speed_vs_embbag": results["embbag_step"]["ms"]
        / (results["forward"]["ms"] + results["backward"]["ms"]),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=Workload.rows)
    parser.add_argument("--chunks", type=int, default=Workload.chunks)
    parser.add_argument("--pooling", type=int, default=Workload.pooling)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--optimizer", choices=["sgd", "adagrad"], default="sgd")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if not dispatch.use_native(device) or not dispatch.use_native_hash(device):
        raise SystemExit(f"no native kernels for {device}: native.DEVICES={sorted(native.DEVICES)}, "
                         f"HASH_DEVICES={sorted(native.HASH_DEVICES)} (build with a CUDA torch: "
                         f"FIITED_EXT_CUDA=1 pip install --no-build-isolation --no-deps -e .)")
    w = Workload(rows=args.rows, chunks=args.chunks, pooling=args.pooling)
    results = run(w, device, args.warmup, args.iterations, args.optimizer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.optimizer}, workload {asdict(w)}")
    for op, r in results.items():
        if op != "ratios":
            print(f"  {op:15s} {r['ms']:9.3f} ms  {r['GBps']:8.1f} GB/s  ({r['bytes_model']})")
    for k, v in results["ratios"].items():
        print(f"  {k:28s} {v:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "optimizer": args.optimizer,
                       "workload": asdict(w),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
