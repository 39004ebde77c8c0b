"""Serving cost of an exported FIITED model against TorchRec's unpruned quantized inference EBC.

A FiitedEmbeddingBagCollection is filled by a few training steps and one pruning cycle, then
exported with ``export_for_inference`` as fp32, fp16 and int8. TorchRec's inference path is
``torchrec.quant.embedding_modules.EmbeddingBagCollection.from_float`` over a float EBC holding
the same logical tables (``dense_weights()``: pruned chunks as zeros, but every row stored), with
int8 weights (TorchRec's usual serving setup: FBGEMM IntNBit TBE, rowwise scale/bias) and, for
like-for-like ratios, fp16 and fp32. All paths serve the same KJT requests under
``torch.inference_mode``.

The exported module holds, per pool, a compact key probe (one bucket of W int64 keys scanned
per id), chunk addresses int32 [S' + 1, K] for the served keys and the live chunks; nothing sized
by num_embeddings (store v2). With ``--miss hashed`` the tables also get a hashed fallback that
ids without an entry read.

Reported per path: median latency per batch, ids/s, an estimate of bytes read per second (ids x
stored bytes of the row they read; FIITED reads per id one probe bucket of W x 8 bytes, its K*4-
byte chunk address, its live chunks, and its fallback row when it has no entry), bytes of tensors
held (unique storages, TBE internals included), and the ratios of latency and bytes to TorchRec
int8 and to TorchRec with the same dtype. ``max|diff|`` is against
fiited-fp32 (TorchRec reads the same values, so it shows only quantization error; with
``--miss hashed`` TorchRec's rows of ids without an entry are zeros where FIITED reads the
fallback, so its max|diff| includes that too).

Usage::

    TORCHREC_FIITED_NATIVE=0 .venv/bin/python benchmarks/bench_serving.py --quick
    .venv/bin/python benchmarks/bench_serving.py            # full size (minutes, ~1 GB)
    .venv/bin/python benchmarks/bench_serving.py --device cuda
"""

import argparse
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
import torch.ao.quantization as tq
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.inference import export_for_inference
from torchrec_fiited.ops.dispatch import use_native

DTYPES = ("fp32", "fp16", "int8")
_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.qint8}


@dataclass(frozen=True)
class ServingBenchConfig:
    """Sizes and repetitions of the serving benchmark.

    Args:
        num_tables: T tables, one feature each.
        num_embeddings: E rows per table.
        embedding_dim: D.
        num_chunks: K of the FIITED module.
        budget: its budget (every byte: chunks, optimizer state, hash tables, sketch, fallback).
        miss: what ids without an entry read in training and serving: "zeros" or "hashed".
        batch_size: B bags per request.
        pooling_factor: L ids per bag.
        zipf_alpha: ids are Zipf(alpha) over a random permutation of each table's rows.
        fill_steps: training steps that fill the pool before the pruning cycle.
        num_batches: distinct requests, cycled.
        warmup: untimed calls per path.
        iterations: timed calls per path (the median is reported).
        num_threads: intra-op threads (1 keeps a shared machine usable and timings steadier).
        seed: of the ids and the modules.
    """

    num_tables: int = 8
    num_embeddings: int = 200_000
    embedding_dim: int = 64
    num_chunks: int = 4
    budget: float = 0.25
    miss: str = "zeros"
    batch_size: int = 2048
    pooling_factor: int = 20
    zipf_alpha: float = 1.05
    fill_steps: int = 4
    num_batches: int = 4
    warmup: int = 3
    iterations: int = 20
    num_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_tables", "num_embeddings", "embedding_dim", "num_chunks", "batch_size",
                     "pooling_factor", "num_batches", "iterations", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_dim % self.num_chunks:
            raise ValueError(
                f"embedding_dim={self.embedding_dim} is not divisible by num_chunks={self.num_chunks}"
            )
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.miss not in ("zeros", "hashed"):
            raise ValueError(f"miss must be 'zeros' or 'hashed', got {self.miss!r}")


QUICK = ServingBenchConfig(num_tables=2, num_embeddings=20_000, batch_size=512, pooling_factor=10,
                           fill_steps=2, num_batches=2, warmup=1, iterations=5)


def make_requests(cfg: ServingBenchConfig, n: int, gen: torch.Generator) -> List[KeyedJaggedTensor]:
    """``n`` KJTs over features f0..f{T-1}: B bags of exactly L Zipf ids each."""
    ranks = torch.arange(1, cfg.num_embeddings + 1, dtype=torch.float64)
    probs = ranks.pow(-cfg.zipf_alpha)
    perms = [torch.randperm(cfg.num_embeddings, generator=gen) for _ in range(cfg.num_tables)]
    per_request = cfg.batch_size * cfg.pooling_factor
    out = []
    for _ in range(n):
        ids = [p[torch.multinomial(probs, per_request, replacement=True, generator=gen)]
               for p in perms]
        out.append(KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{t}" for t in range(cfg.num_tables)], values=torch.cat(ids),
            lengths=torch.full((cfg.num_tables * cfg.batch_size,), cfg.pooling_factor),
        ))
    return out


def tables_of(cfg: ServingBenchConfig) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{t}", embedding_dim=cfg.embedding_dim,
                           num_embeddings=cfg.num_embeddings, feature_names=[f"f{t}"])
        for t in range(cfg.num_tables)
    ]


def train_fiited(cfg: ServingBenchConfig, device: torch.device) -> FiitedEmbeddingBagCollection:
    """A FIITED module after ``fill_steps`` training steps and one pruning cycle."""
    fiited_cfg = FiitedConfig(num_chunks=cfg.num_chunks, budget=cfg.budget, prune_interval=0,
                              learning_rate=0.01, seed=cfg.seed, miss=cfg.miss)
    ebc = FiitedEmbeddingBagCollection(tables_of(cfg), fiited_cfg, device=device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for kjt in make_requests(cfg, cfg.fill_steps, gen):
        ebc(kjt.to(device)).values().sum().backward()
    ebc.prune()
    return ebc.eval()


def torchrec_quant_ebc(
    cfg: ServingBenchConfig, dense: Dict[str, torch.Tensor], dtype: str, device: torch.device
) -> QuantEmbeddingBagCollection:
    """TorchRec's inference EBC over the same logical tables ``dense`` (fp32 [E, D] each)."""
    ebc = EmbeddingBagCollection(tables=tables_of(cfg), device=device)
    with torch.no_grad():
        for name, w in dense.items():
            ebc.embedding_bags[name].weight.copy_(w)
    ebc.qconfig = tq.QConfig(
        activation=tq.PlaceholderObserver.with_args(dtype=torch.float),
        weight=tq.PlaceholderObserver.with_args(dtype=_TORCH_DTYPE[dtype]),
    )
    return QuantEmbeddingBagCollection.from_float(ebc)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the unique storages a module holds, TBE modules kept in ``_emb_modules`` too."""
    modules = list(module.modules())
    for m in list(modules):
        modules += [e for e in getattr(m, "_emb_modules", []) if isinstance(e, torch.nn.Module)]
    storages: Dict[Any, int] = {}
    for m in modules:
        # TBE keeps its weights as plain attributes (weights_host, ...), not buffers.
        tensors = [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        tensors += list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        for t in tensors:
            s = t.untyped_storage()
            storages[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(storages.values())


def read_bytes_fiited(served, kjt: KeyedJaggedTensor) -> int:
    """Bytes a FIITED lookup reads per id: one probe bucket (W int64 keys), its K*4-byte chunk
    address, its live chunk rows, and its fallback row when it has no entry (``miss="hashed"``)."""
    table_of = {f: t for t in served.spec.tables for f in t.feature_names}
    bucket = {p.name: p.bucket_size for p in served.spec.pools}
    total = 0
    for feature, jt in kjt.to_dict().items():
        table = table_of[feature]
        pool = served.pools[table.pool]
        found = served.served_slots(table.name, jt.values())
        slots = pool.chunk_slots[torch.where(found >= 0, found, pool.chunk_slots.shape[0] - 1)]
        weights = pool.weights
        total += found.numel() * (bucket[table.pool] * 8 + slots.shape[1] * 4)
        total += int((slots >= 0).sum()) * weights.shape[1] * weights.element_size()
        if table.name in served.fallbacks:
            fb = served.fallbacks[table.name].weights
            total += int((found < 0).sum()) * fb.shape[1] * fb.element_size()
    return total


def read_bytes_torchrec(qebc, kjt: KeyedJaggedTensor) -> int:
    """Bytes a TorchRec lookup reads: one stored row (codes plus aligned scale/bias) per id."""
    row = next(iter(qebc.state_dict().values()))
    return kjt.values().numel() * row.shape[1] * row.element_size()


def time_median(fn: Callable[[int], Any], cfg: ServingBenchConfig, device: torch.device) -> float:
    """Median seconds of ``fn(i)`` over ``cfg.iterations`` calls after ``cfg.warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(cfg.warmup):
        fn(i)
    sync()
    times = []
    for i in range(cfg.iterations):
        start = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(cfg: ServingBenchConfig, device: torch.device) -> List[Dict[str, Any]]:
    """One row per path: name, latency_s, bytes, read_bytes, max_diff."""
    fiited = train_fiited(cfg, device)
    dense = fiited.dense_weights()
    gen = torch.Generator().manual_seed(cfg.seed)
    requests = [r.to(device) for r in make_requests(cfg, cfg.num_batches, gen)]
    paths = {f"fiited-{dt}": export_for_inference(fiited, dt) for dt in DTYPES}
    paths.update({f"torchrec-{dt}": torchrec_quant_ebc(cfg, dense, dt, device) for dt in DTYPES})
    del fiited, dense
    rows = []
    with torch.inference_mode():
        reference = [paths["fiited-fp32"](r).values() for r in requests]
        for name, module in paths.items():
            latency = time_median(lambda i: module(requests[i % len(requests)]), cfg, device)
            diff = max(float((module(r).values() - ref).abs().max())
                       for r, ref in zip(requests, reference))
            reader = read_bytes_fiited if name.startswith("fiited") else read_bytes_torchrec
            rows.append({"name": name, "latency_s": latency, "bytes": tensor_bytes(module),
                         "read_bytes": statistics.mean(reader(module, r) for r in requests),
                         "max_diff": diff})
    return rows


def report(cfg: ServingBenchConfig, rows: List[Dict[str, Any]], device: torch.device) -> None:
    by_name = {r["name"]: r for r in rows}
    base = by_name["torchrec-int8"]
    ids = cfg.num_tables * cfg.batch_size * cfg.pooling_factor
    print(f"config: {cfg}")
    print(f"device={device} threads={torch.get_num_threads()} native_fp32_lookup={use_native(device)}")
    print(f"{'path':<15}{'lat ms':>9}{'Mids/s':>8}{'GB/s':>7}{'MiB':>9}"
          f"{'lat/tr-same':>12}{'mem/tr-same':>12}{'lat/tr-int8':>12}{'mem/tr-int8':>12}{'max|diff|':>11}")
    for r in rows:
        same = by_name["torchrec-" + r["name"].split("-")[1]]
        print(f"{r['name']:<15}{r['latency_s'] * 1e3:>9.2f}{ids / r['latency_s'] / 1e6:>8.1f}"
              f"{r['read_bytes'] / r['latency_s'] / 1e9:>7.2f}{r['bytes'] / 2**20:>9.2f}"
              f"{r['latency_s'] / same['latency_s']:>12.2f}{r['bytes'] / same['bytes']:>12.3f}"
              f"{r['latency_s'] / base['latency_s']:>12.2f}{r['bytes'] / base['bytes']:>12.3f}"
              f"{r['max_diff']:>11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--miss", choices=("zeros", "hashed"), default="zeros",
                        help="what ids without an entry read (FiitedConfig.miss)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else ServingBenchConfig()
    cfg = dataclasses.replace(cfg, miss=args.miss)
    if args.iterations:
        cfg = dataclasses.replace(cfg, iterations=args.iterations)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(args.device)
    report(cfg, measure(cfg, device), device)


if __name__ == "__main__":
    main()
