"""Step time of a sharded FIITED collection against torchrec's sharded fused EBC, on N gloo ranks.

Both run under DistributedModelParallel on the same tables and batches: ``full`` is torchrec's
``EmbeddingBagCollection`` with a fused rowwise Adagrad (FBGEMM TBE on CPU), ``fiited`` the FIITED
collection at the given budget, K chunks, with a pruning cycle every ``--prune-interval`` steps.
One training step = forward + backward (fused update, and the coordinated cycle when due) of the
collection alone, timed on rank 0 after a warm-up; each variant runs in its own set of processes.
Results are ratios to ``full`` measured in the same run.

Usage::

    .venv/bin/python benchmarks/bench_dist.py                     # 2 ranks, table- and row-wise
    .venv/bin/python benchmarks/bench_dist.py --quick
"""

import argparse
import os
import socket
import statistics
import tempfile
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _batches(args, rank: int, world_size: int, steps: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 + rank)
    keys = [f"f{i}" for i in range(args.tables)]
    out = []
    for _ in range(steps):
        lengths = torch.full((args.tables * args.batch,), args.pooling)
        # Zipf-like skew: most ids fall on a small head of each table.
        u = torch.rand(int(lengths.sum()), generator=g)
        ids = (u ** 3 * args.rows).long()
        out.append(KeyedJaggedTensor.from_lengths_sync(keys, ids, lengths))
    return out


def _model(args, variant: str):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(name=f"t{i}", num_embeddings=args.rows, embedding_dim=args.dim,
                           feature_names=[f"f{i}"])
        for i in range(args.tables)
    ]
    if variant == "full":
        from torch.distributed.optim import _apply_optimizer_in_backward
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
        _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.01})
        return ebc
    from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

    return FiitedEmbeddingBagCollection(
        tables, FiitedConfig(num_chunks=args.num_chunks, budget=args.budget,
                             prune_interval=args.prune_interval, learning_rate=0.01),
    )


def _worker(rank: int, world_size: int, port: int, args, variant: str, sharding: str, out_path: str):
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv

    from torchrec_fiited.distributed import fiited_sharders, make_fiited_planner

    model = _model(args, variant)
    constraints = {f"t{i}": ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])
                   for i in range(args.tables)}
    sharders = fiited_sharders()
    if variant == "full" and sharding == "row_wise":
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        class _CpuRowWise(EmbeddingBagCollectionSharder):  # torchrec offers RW only on CUDA
            def sharding_types(self, compute_device_type):
                return ["table_wise", "row_wise"]

        sharders = [_CpuRowWise()] + sharders[1:]
    plan = make_fiited_planner(world_size, "cpu", args.batch, constraints).collective_plan(
        model, sharders, dist.group.WORLD
    )
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    batches = _batches(args, rank, world_size, args.warmup + args.steps)
    times: List[float] = []
    profiler = None
    for i, kjt in enumerate(batches):
        if args.profile and rank == 0 and i == args.warmup:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        dist.barrier()
        start = time.perf_counter()
        out = dmp(kjt)
        out.values().sum().backward()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{args.profile}.{variant}.{sharding}")
    if rank == 0:
        torch.save(times, out_path)
    dist.destroy_process_group()


def _run(args, variant: str, sharding: str) -> List[float]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "times.pt")
        mp.start_processes(_worker, args=(args.world_size, port, args, variant, sharding, path),
                           nprocs=args.world_size, start_method="spawn")
        return torch.load(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048, help="per rank")
    p.add_argument("--pooling", type=int, default=10)
    p.add_argument("--num-chunks", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--prune-interval", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="per rank")
    p.add_argument("--shardings", nargs="+", default=["table_wise", "row_wise"])
    p.add_argument("--quick", action="store_true", help="small sizes, few steps")
    p.add_argument("--profile", help="cProfile rank 0's timed steps into <this>.<variant>.<sharding>")
    args = p.parse_args()
    if args.quick:
        args.rows, args.batch, args.steps, args.warmup, args.tables = 10_000, 256, 6, 2, 4
    print(f"{args.world_size} ranks x {args.threads} thread(s); {args.tables} tables x {args.rows} x "
          f"{args.dim}, batch {args.batch}/rank, L={args.pooling}; FIITED K={args.num_chunks} "
          f"budget={args.budget}, cycle every {args.prune_interval} steps")
    print("| sharding | variant | median step ms | best step ms | speed vs full (median) |")
    print("| --- | --- | --- | --- | --- |")
    for sharding in args.shardings:
        results: Dict[str, Any] = {}
        for variant in ("full", "fiited"):
            results[variant] = _run(args, variant, sharding)
        base = statistics.median(results["full"])
        for variant, times in results.items():
            med = statistics.median(times)
            print(f"| {sharding} | {variant} | {med * 1e3:.1f} | {min(times) * 1e3:.1f} | "
                  f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
