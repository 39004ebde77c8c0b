"""Per-rank bodies of the distributed tests (module level, so spawned ranks can import them)."""

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import NeverReuse
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.distributed import FiitedEmbeddingBagCollectionSharder
from torchrec_fiited.distributed.gather import gather_state_dict, logical_tables
from torchrec_fiited.store import key_row
from torchrec_fiited.store.sizing import full_table_bytes, slot_bytes

FEATURES = ["f0", "f1", "f2", "f3"]


def tables(stride: int = 1) -> List[EmbeddingBagConfig]:
    """Tables of two dims, one with two features: column shards then hold 1 or 2 chunks.

    ``stride`` times the rows, for batches of the same ``stride`` (``global_batches``): the same
    at most 64, 48 and 40 distinct ids per table, spread over the rows, and pools sized by
    ``stride`` times the bytes. Store v2 spends bytes on metadata, so even budget 1.0 holds an
    entry for only some rows; with a large stride every touched row fits.
    """
    return [
        EmbeddingBagConfig(
            name="t0", num_embeddings=64 * stride, embedding_dim=8, feature_names=["f0"]
        ),
        EmbeddingBagConfig(
            name="t1", num_embeddings=48 * stride, embedding_dim=8, feature_names=["f1", "f2"]
        ),
        EmbeddingBagConfig(
            name="t2", num_embeddings=40 * stride, embedding_dim=16, feature_names=["f3"]
        ),
    ]


# Rows per distinct id where every touched row must find an entry (see ``tables``).
ROOMY_STRIDE = 64


def global_batches(
    num_steps: int, batch_size: int, seed: int = 0, stride: int = 1
) -> List[KeyedJaggedTensor]:
    """Global batches with skewed ids (some hot rows), 0-3 ids per bag; ids are multiples of
    ``stride`` (for ``tables(stride)``)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"f0": 64, "f1": 48, "f2": 48, "f3": 40}
    out = []
    for _ in range(num_steps):
        lengths = torch.randint(0, 4, (len(FEATURES), batch_size), generator=g)
        values = []
        for i, f in enumerate(FEATURES):
            n = int(lengths[i].sum())
            ids = (torch.rand(n, generator=g) ** 2 * sizes[f]).long() * stride  # skewed to low ids
            values.append(ids)
        out.append(
            KeyedJaggedTensor.from_lengths_sync(FEATURES, torch.cat(values), lengths.reshape(-1))
        )
    return out


def rank_slice(kjt: KeyedJaggedTensor, rank: int, world_size: int) -> KeyedJaggedTensor:
    """This rank's contiguous slice of a global batch (same keys)."""
    B = kjt.stride()
    b = B // world_size
    lo, hi = rank * b, (rank + 1) * b
    per = kjt.to_dict()
    values, lengths = [], []
    for f in kjt.keys():
        jt = per[f]
        off = jt.offsets()
        values.append(jt.values()[off[lo] : off[hi]])
        lengths.append(jt.lengths()[lo:hi])
    return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))


def plan_for(kind: str, world_size: int, module) -> ShardingPlan:
    sharder = FiitedEmbeddingBagCollectionSharder()
    if kind == "table_wise":
        per = {"t0": table_wise(rank=0), "t1": table_wise(rank=1 % world_size), "t2": table_wise(rank=0)}
    elif kind == "row_wise":
        per = {t: row_wise() for t in ("t0", "t1", "t2")}
    elif kind == "column_wise":
        ranks = list(range(world_size))
        per = {"t0": column_wise(ranks=ranks), "t1": table_wise(rank=1 % world_size),
               "t2": column_wise(ranks=ranks)}
    else:
        raise ValueError(kind)
    mod_plan = construct_module_sharding_plan(
        module, per, world_size=world_size, device_type="cpu", sharder=sharder
    )
    return ShardingPlan({"": mod_plan})


def sharded_collection(dmp):
    """The ShardedFiitedEmbeddingBagCollection inside a DMP."""
    return next(m for m in dmp.modules() if type(m).__name__ == "ShardedFiitedEmbeddingBagCollection")


def loss_weights(seed: int = 1) -> torch.Tensor:
    return torch.randn(4096, 40, generator=torch.Generator().manual_seed(seed))


GLOBAL_BATCH = 16


# ---- DLRM on DMP with the planner ----------------------------------------------------------

DLRM_TABLES = lambda stride=1: [  # noqa: E731 - one line per table reads best
    EmbeddingBagConfig(
        name="t0", num_embeddings=64 * stride, embedding_dim=8, feature_names=["f0"]
    ),
    # MEAN: under row-wise plans its bags are split over ranks and averaged after the dist.
    EmbeddingBagConfig(
        name="t1", num_embeddings=48 * stride, embedding_dim=8, feature_names=["f1", "f2"],
        pooling=PoolingType.MEAN,
    ),
    EmbeddingBagConfig(
        name="t2", num_embeddings=40 * stride, embedding_dim=8, feature_names=["f3"]
    ),
]


def dlrm(config: Dict[str, Any], stride: int = 1):
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(0)
    ebc = FiitedEmbeddingBagCollection(DLRM_TABLES(stride), FiitedConfig(**config))
    return DLRM(
        embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )


def dlrm_batches(num_steps: int, batch_size: int = GLOBAL_BATCH, stride: int = 1):
    from torchrec.datasets.utils import Batch

    g = torch.Generator().manual_seed(7)
    out = []
    for kjt in global_batches(num_steps, batch_size, seed=3, stride=stride):
        dense = torch.randn(batch_size, 4, generator=g)
        labels = (torch.rand(batch_size, generator=g) < 0.3).float()
        out.append(Batch(dense_features=dense, sparse_features=kjt, labels=labels))
    return out


def batch_slice(batch, rank: int, world_size: int):
    from torchrec.datasets.utils import Batch

    b = batch.labels.numel() // world_size
    return Batch(
        dense_features=batch.dense_features[rank * b : (rank + 1) * b],
        sparse_features=rank_slice(batch.sparse_features, rank, world_size),
        labels=batch.labels[rank * b : (rank + 1) * b],
    )


def planned_dmp(model, world_size: int, sharding_type: str):
    from torchrec.distributed.planner.types import ParameterConstraints

    from torchrec_fiited.distributed import fiited_sharders, make_fiited_planner

    # Column-wise in halves (torchrec's default minimum of 32 columns would keep these 8-column
    # tables whole, one shard each).
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=[sharding_type],
            min_partition=t.embedding_dim // 2 if sharding_type == "column_wise" else None,
        )
        for t in DLRM_TABLES()
    }
    sharders = fiited_sharders()
    plan = make_fiited_planner(world_size, "cpu", GLOBAL_BATCH // world_size, constraints).collective_plan(
        model, sharders, dist.group.WORLD
    )
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=plan, sharders=sharders,
    )
    return dmp, plan


def _loss(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels)


class WithLoss(torch.nn.Module):
    """DLRM -> (loss, (loss, logits)): the shape TrainPipelineSparseDist expects of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = _loss(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def dlrm_steps(rank: int, world_size: int, sharding_type: str, config: Dict[str, Any],
               num_steps: int, pipelined: bool, stride: int = 1) -> Dict[str, Any]:
    """Train the DLRM on DMP (plain loop, or TrainPipelineSparseDist) on this rank's slices."""
    dmp, plan = planned_dmp(WithLoss(dlrm(config, stride)), world_size, sharding_type)
    dense_opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "embedding_bags" not in n], lr=0.1)
    batches = [batch_slice(b, rank, world_size) for b in dlrm_batches(num_steps, stride=stride)]
    outputs, pipelined_modules = [], []
    if pipelined:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(dmp, dense_opt, torch.device("cpu"))
        it = iter(batches)
        for _ in range(num_steps):
            outputs.append(pipeline.progress(it))
        pipelined_modules = [type(m).__name__ for m in pipeline._pipelined_modules]
    else:
        for batch in batches:
            loss, out = dmp(batch)
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            outputs.append(out)
    sharded = sharded_collection(dmp)
    prefix = "model.sparse_arch.embedding_bag_collection."
    state = gather_state_dict({k[len(prefix):]: v for k, v in dmp.state_dict().items() if k.startswith(prefix)})
    return {
        "losses": [float(l) for l, _ in outputs],
        "logits": [x for _, x in outputs],
        "plan": {t: ps.sharding_type for mod in plan.plan.values() for t, ps in mod.items()},
        "num_shards": {
            t: len(ps.sharding_spec.shards) for mod in plan.plan.values() for t, ps in mod.items()
        },
        "last_cycle": sharded._lookups[0]._last_cycle,
        "state": state,
        "pipelined": pipelined_modules,
        # This rank's FIITED bytes (every tensor of its lookups) and the full bytes of its shards.
        "local_bytes": sum(s["bytes"]["total"] for s in sharded.stats().values()),
        "local_full_bytes": sum(
            full_table_bytes(l.num_rows, l.dim, lk.store.optimizer)
            for lk in sharded._lookups for l in lk.store.layouts.values()
        ),
        "slot_bytes": [
            slot_bytes(p.chunk_size, p.optimizer, p.capacity)
            for lk in sharded._lookups for p in lk.store.pools.values()
        ],
        # Each table's hashed fallback (miss="hashed") on this rank, by logical table.
        "fallbacks": {
            lk.store.layouts[name].logical_name: fb.weights.clone()
            for lk in sharded._lookups for name, fb in lk.store.fallbacks.items()
        },
        # Global rows this rank holds resident, per table.
        "resident_rows": {
            l.logical_name: key_row(lk.store.entries_of(name).keys_of(lk.store.table_entries(name)))
            for lk in sharded._lookups for name, l in lk.store.layouts.items()
        },
    }


def dlrm_single(config: Dict[str, Any], num_steps: int, stride: int = 1) -> Dict[str, Any]:
    model = dlrm(config, stride)
    dense_opt = torch.optim.SGD([p for n, p in model.named_parameters() if "embedding_bags" not in n], lr=0.1)
    losses, logits_seen = [], []
    for batch in dlrm_batches(num_steps, stride=stride):
        logits = model(batch.dense_features, batch.sparse_features)
        loss = _loss(logits, batch.labels)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        losses.append(float(loss))
        logits_seen.append(logits.detach())
    ebc = model.sparse_arch.embedding_bag_collection
    sketch_mass = sum(float(sk.counts.sum()) for sk in ebc.store.sketches.values())
    fallbacks = {name: fb.weights.clone() for name, fb in ebc.store.fallbacks.items()}
    return {"losses": losses, "logits": logits_seen, "last_cycle": ebc._last_cycle,
            "state": logical_tables(ebc), "sketch_mass": sketch_mass, "fallbacks": fallbacks}


# ---- DCP: resume in the same plan, load in another world size -----------------------------------

def _eval_outputs(dmp, rank: int, world_size: int, stride: int = 1) -> torch.Tensor:
    kjt = global_batches(1, GLOBAL_BATCH, seed=11, stride=stride)[0]
    dmp.eval()
    with torch.no_grad():
        out = dmp(rank_slice(kjt, rank, world_size))
    dmp.train()
    values = torch.cat([out[f] for f in FEATURES], dim=1)
    every = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(every, values)
    return torch.cat(every)


def _ebc_dmp(kind: str, world_size: int, config: Dict[str, Any], stride: int = 1):
    module = FiitedEmbeddingBagCollection(tables(stride), FiitedConfig(**config))
    return DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=plan_for(kind, world_size, module), sharders=[FiitedEmbeddingBagCollectionSharder()],
    )


def _train_steps(dmp, rank: int, world_size: int, batches) -> None:
    W = loss_weights()
    b = GLOBAL_BATCH // world_size
    for kjt in batches:
        values = torch.cat(list(dmp(rank_slice(kjt, rank, world_size)).to_dict().values()), dim=1)
        (values * W[rank * b : (rank + 1) * b, : values.shape[1]]).sum().backward()


def dcp_save(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str, stride: int = 1
) -> torch.Tensor:
    """Train a few steps, save with DCP, return the eval outputs on a fixed global batch."""
    import torch.distributed.checkpoint as dcp

    dmp = _ebc_dmp(kind, world_size, config, stride)
    _train_steps(dmp, rank, world_size, global_batches(5, GLOBAL_BATCH, stride=stride))
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return _eval_outputs(dmp, rank, world_size, stride)


def dcp_load(rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str) -> torch.Tensor:
    """A fresh collection under another plan or world size, loaded from ``path``."""
    import torch.distributed.checkpoint as dcp

    dmp = _ebc_dmp(kind, world_size, config)
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state)
    return _eval_outputs(dmp, rank, world_size)


def dcp_load_resharded(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str, stride: int = 1
) -> torch.Tensor:
    """A fresh collection under any plan or world size, loaded with ``load_resharded``."""
    from torchrec_fiited.distributed import load_resharded

    dmp = _ebc_dmp(kind, world_size, config, stride)
    sharded = sharded_collection(dmp)
    load_resharded(sharded, path)
    return _eval_outputs(dmp, rank, world_size, stride)


def dcp_load_resharded_fallbacks(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str, stride: int = 1
) -> Dict[str, Any]:
    """``load_resharded``: the eval outputs, the tables whose fallback restarted, and whether
    each fallback changed from a fresh one's."""
    from torchrec_fiited.distributed import load_resharded

    dmp = _ebc_dmp(kind, world_size, config, stride)
    sharded = sharded_collection(dmp)
    fresh = {n: fb.weights.clone() for lk in sharded._lookups for n, fb in lk.store.fallbacks.items()}
    restarted = load_resharded(sharded, path)
    loaded = {n: not torch.equal(fb.weights, fresh[n])
              for lk in sharded._lookups for n, fb in lk.store.fallbacks.items()}
    return {"outputs": _eval_outputs(dmp, rank, world_size, stride), "restarted": restarted,
            "loaded": loaded}


def dcp_load_resharded_errors(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str
) -> str:
    """``load_resharded`` into pools too small: the error, and whether the state was left."""
    from torchrec_fiited.distributed import load_resharded

    dmp = _ebc_dmp(kind, world_size, config)
    sharded = sharded_collection(dmp)
    before = {k: v.clone() for k, v in sharded.state_dict().items()}
    try:
        load_resharded(sharded, path)
    except ValueError as e:
        after = sharded.state_dict()
        unchanged = all(torch.equal(after[k], v) for k, v in before.items())
        return f"{e} unchanged={unchanged}"
    return "loaded"


def dcp_resume(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], path: str, stride: int
):
    """Train 3 steps, save with DCP, train 4 more; then a fresh collection of the same plan loads
    the checkpoint and trains the same 4 steps. Returns both runs' eval outputs, gathered states,
    this rank's state_dict tensor bytes and its stats, and the largest shard key size."""
    import torch.distributed.checkpoint as dcp

    batches = global_batches(7, GLOBAL_BATCH, seed=5, stride=stride)
    runs = {}
    first = _ebc_dmp(kind, world_size, config, stride)
    _train_steps(first, rank, world_size, batches[:3])
    saved = first.state_dict()
    dcp.save(saved, checkpoint_id=path)
    _train_steps(first, rank, world_size, batches[3:])
    runs["whole"] = first
    second = _ebc_dmp(kind, world_size, config, stride)
    state = second.state_dict()
    dcp.load(state, checkpoint_id=path)
    second.load_state_dict(state)
    _train_steps(second, rank, world_size, batches[3:])
    runs["resumed"] = second
    out = {
        name: {"outputs": _eval_outputs(dmp, rank, world_size, stride),
               "state": gather_state_dict(dmp.state_dict()),
               "steps": dmp.module.steps_done,
               "own": {k: v.clone() for k, v in dmp.state_dict().items()}}
        for name, dmp in runs.items()
    }
    out["saved_numels"] = {k: v.numel() for k, v in saved.items()}
    return out


# ---- export of a sharded model, bad input -----------------------------------------------------

def export_sharded(rank: int, world_size: int, kind: str, config: Dict[str, Any], stride: int):
    """Train sharded, gather to rank 0, export for inference: the sharded eval outputs and the
    exported module's outputs on the same global batch."""
    from torchrec_fiited import export_for_inference
    from torchrec_fiited.distributed import gather_unsharded

    dmp = _ebc_dmp(kind, world_size, config, stride)
    _train_steps(dmp, rank, world_size, global_batches(5, GLOBAL_BATCH, stride=stride))
    sharded_out = _eval_outputs(dmp, rank, world_size, stride)
    unsharded = gather_unsharded(dmp.module)
    if rank != 0:
        return None
    exported = export_for_inference(unsharded).eval()
    kjt = global_batches(1, GLOBAL_BATCH, seed=11, stride=stride)[0]
    with torch.no_grad():
        out = exported(kjt)
    return sharded_out, torch.cat([out[f] for f in FEATURES], dim=1)


def bad_inputs(rank: int, world_size: int) -> List[str]:
    """Errors the sharded collection raises for bad batches, before anything is routed."""
    # 8x the rows (40 x 8 in t2, so 999 is still out of range): row shards of the tables at the
    # default budget 0.25 could not hold a bucket of entries and a slot.
    dmp = _ebc_dmp("row_wise", world_size, dict(num_chunks=4), 8)
    good = rank_slice(global_batches(1, GLOBAL_BATCH)[0], rank, world_size)
    errors = []
    bad_id = KeyedJaggedTensor.from_lengths_sync(
        good.keys(), torch.cat([good.values()[:-1], torch.tensor([999])]), good.lengths()
    )
    negative = KeyedJaggedTensor.from_lengths_sync(
        good.keys(), torch.cat([torch.tensor([-1]), good.values()[1:]]), good.lengths()
    )
    wrong_keys = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1", "f2", "nope"], good.values(), good.lengths()
    )
    for kjt in (bad_id, negative, wrong_keys):
        try:
            dmp(kjt)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    # The state is untouched: a good batch still runs, at step 0.
    dmp(good)
    errors.append(f"steps_done={dmp.module.steps_done}")
    return errors


def fused_optimizer_drives_lookups(rank: int, world_size: int) -> Dict[str, Any]:
    """DMP collects the sharded module's fused optimizer; an LR set there reaches every shard.
    (Tables where every touched row finds an entry, so the three steps update the same rows.)"""
    stride = ROOMY_STRIDE
    dmp = _ebc_dmp("row_wise", world_size, dict(num_chunks=4, learning_rate=0.1), stride)
    kjt = rank_slice(global_batches(1, GLOBAL_BATCH, stride=stride)[0], rank, world_size)

    def step_and_weights():
        dmp(kjt).values().sum().backward()
        state = gather_state_dict(dmp.state_dict())
        return None if state is None else {
            k: v for k, v in state.items() if k.endswith(".weight") or k.endswith(".fiited_rows")
        }

    first = step_and_weights()
    second = step_and_weights()
    for group in dmp.fused_optimizer.param_groups:
        group["lr"] = 0.0
    third = step_and_weights()
    out = {"keys": sorted(dmp.fused_optimizer.params), "state": dmp.fused_optimizer.state_dict()}
    if first is not None:
        rows = [k for k in first if k.endswith(".fiited_rows")]
        out["same_rows"] = all(torch.equal(first[k], x[k]) for k in rows for x in (second, third))
        weights = [k for k in first if k.endswith(".weight")]
        out["live_values"] = sum(int((first[k] != 0).sum()) for k in weights)
        out["moved"] = any(not torch.equal(first[k], second[k]) for k in weights)
        out["frozen"] = all(torch.equal(second[k], third[k]) for k in weights)
    return out


def load_single_process_state(
    rank: int, world_size: int, kind: str, config: Dict[str, Any], load_config: Dict[str, Any]
):
    """A single-process module's plan-independent state loads into a sharded one."""
    from torchrec_fiited.distributed.gather import logical_tables

    torch.manual_seed(0)
    single = FiitedEmbeddingBagCollection(tables(), FiitedConfig(**config))
    single.allow_replicated = True  # every rank trains the same copy on the same global batches
    W = loss_weights()
    for kjt in global_batches(5, GLOBAL_BATCH):
        values = torch.cat(list(single(kjt).to_dict().values()), dim=1)
        (values * W[: values.shape[0], : values.shape[1]]).sum().backward()
    single.eval()
    with torch.no_grad():
        out = single(global_batches(1, GLOBAL_BATCH, seed=11)[0])
    want = torch.cat([out[f] for f in FEATURES], dim=1)
    dmp = _ebc_dmp(kind, world_size, load_config)
    dmp.load_state_dict(logical_tables(single))
    return want, _eval_outputs(dmp, rank, world_size)


# ---- planner estimate against the bytes a sharded module allocates -----------------------------

def planner_tables() -> List[EmbeddingBagConfig]:
    """Two tables sharing a pool (cs=4) and one with a pool of its own chunk size (cs=8), K=4."""
    return [
        EmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=16, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", num_embeddings=600, embedding_dim=16, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", num_embeddings=800, embedding_dim=32, feature_names=["f2"]),
    ]


def sharded_bytes(
    rank: int, world_size: int, config: Dict[str, Any], plans: Dict[str, ShardingPlan],
    table_list: Optional[List[EmbeddingBagConfig]] = None,
) -> Dict[str, Dict[str, int]]:
    """Per plan, after a training step on this rank: the bytes of the sharded module's tensors,
    of its FIITED lookups' tensors, the sum of their ``stats()`` totals, and their number
    (tables: ``planner_tables()`` unless given)."""
    out = {}
    g = torch.Generator().manual_seed(rank)
    table_list = table_list or planner_tables()
    for name, plan in plans.items():
        module = FiitedEmbeddingBagCollection(table_list, FiitedConfig(**config))
        sharded = FiitedEmbeddingBagCollectionSharder().shard(
            module, plan.plan[""], ShardingEnv.from_process_group(dist.group.WORLD), torch.device("cpu")
        )
        keys = [t.feature_names[0] for t in table_list]
        rows = [t.num_embeddings for t in table_list]
        lengths = torch.randint(0, 4, (len(keys), 8), generator=g)
        ids = [torch.randint(0, r, (int(n),), generator=g) for r, n in zip(rows, lengths.sum(1))]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(ids), lengths.reshape(-1))
        sharded(kjt).values().sum().backward()
        out[name] = {
            "tensor_bytes": _tensor_bytes(sharded),
            "lookup_bytes": sum(_tensor_bytes(lookup) for lookup in sharded._lookups),
            "stats_total": sum(s["bytes"]["total"] for s in sharded.stats().values()),
            "lookups": len(sharded._lookups),
        }
    return out


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.buffers()) + list(module.parameters())
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- DMP with torchrec's default sharders leaves the collection unsharded ------------------------

def default_sharders(rank: int, world_size: int) -> Dict[str, Any]:
    """DMP without FIITED's sharder: the collection stays whole on every rank. Training refuses;
    eval reads; with ``allow_replicated`` the replicas train (and drift apart)."""
    batch = batch_slice(dlrm_batches(1)[0], rank, world_size)
    dmp = DistributedModelParallel(
        WithLoss(dlrm(dict(num_chunks=4))), env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
    )
    ebc = [m for m in dmp.modules() if isinstance(m, FiitedEmbeddingBagCollection)]
    out: Dict[str, Any] = {"unsharded": len(ebc)}
    try:
        dmp(batch)[0].backward()
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    out["steps_after_error"] = int(ebc[0].steps_done)
    dmp.eval()
    with torch.no_grad():
        out["eval_logits"] = dmp(batch)[1][1]
    dmp.train()
    ebc[0].allow_replicated = True
    dmp(batch)[0].backward()
    out["steps_replicated"] = int(ebc[0].steps_done)
    return out


def sharded_buffer_reuse(rank: int, world_size: int, kind: str) -> Dict[str, Any]:
    """A sharded collection's lookups reuse their step buffers: the per-id keys sit in the same
    memory every step, training is bitwise what fresh tensors give, and a second backward through
    one forward is refused."""
    config = dict(num_chunks=2, budget=0.5, prune_interval=2, sample_size=20, enforce_ratio=0.0,
                  learning_rate=0.1)
    reused, fresh = _ebc_dmp(kind, world_size, config), _ebc_dmp(kind, world_size, config)
    for lookup in sharded_collection(fresh)._lookups:
        lookup._step_buffers = NeverReuse()
    lookups = sharded_collection(reused)._lookups
    free_bytes: List[List[int]] = []
    for kjt in global_batches(4, GLOBAL_BATCH):
        for dmp in (reused, fresh):
            _train_steps(dmp, rank, world_size, [kjt])
        free_bytes.append([lookup._step_buffers.free_bytes for lookup in lookups])
    equal = all(
        torch.equal(a, b)
        for la, lb in zip(lookups, sharded_collection(fresh)._lookups)
        for a, b in zip(la.state_dict().values(), lb.state_dict().values())
        if torch.is_tensor(a)
    )
    seen = []
    for lookup in lookups:
        resolve = lookup._resolve

        def spy(features, reuse=False, resolve=resolve):
            batch = resolve(features, reuse)
            seen.append(batch)
            return batch

        lookup._resolve = spy
    for kjt in global_batches(2, GLOBAL_BATCH, seed=5):
        _train_steps(reused, rank, world_size, [kjt])
    keys_ptrs = [[pb.keys.data_ptr() for pb in b.pools] for b in seen]
    refused = ""
    values = torch.cat(list(reused(rank_slice(global_batches(1, GLOBAL_BATCH)[0], rank,
                                              world_size)).to_dict().values()), dim=1)
    values.sum().backward(retain_graph=True)
    try:
        values.sum().backward()
    except RuntimeError as e:
        refused = str(e)
    return {"equal": equal, "free_bytes": free_bytes, "keys_ptrs": keys_ptrs,
            "num_lookups": len(lookups), "refused": refused}


def plain_training_step(rank: int, world_size: int) -> int:
    """A training step of an unsharded collection in this process group: steps done."""
    ebc = FiitedEmbeddingBagCollection(tables(), FiitedConfig(num_chunks=4))
    ebc(global_batches(1, GLOBAL_BATCH)[0]).values().sum().backward()
    return int(ebc.steps_done)


# ---- drop-in KJTs: other modules' keys, VBE ------------------------------------------------------

def vbe_and_padded(kjt: KeyedJaggedTensor, gen: torch.Generator):
    """A VBE KJT over ``kjt``'s keys (feature i keeps its first i + 2 bags, the B rows read them
    through random inverse indices) and the same batch with every row's bag written out."""
    B, keys = kjt.stride(), kjt.keys()
    per = kjt.to_dict()
    inverse = torch.stack([torch.randint(0, i + 2, (B,), generator=gen) for i in range(len(keys))])
    vbe_values, vbe_lengths, values, lengths = [], [], [], []
    for i, f in enumerate(keys):
        off, ids = per[f].offsets(), per[f].values()
        vbe_values.append(ids[: off[i + 2]])
        vbe_lengths.append(per[f].lengths()[: i + 2])
        for b in inverse[i].tolist():
            values.append(ids[off[b] : off[b + 1]])
            lengths.append(int(off[b + 1] - off[b]))
    vbe = KeyedJaggedTensor(
        keys=keys, values=torch.cat(vbe_values), lengths=torch.cat(vbe_lengths),
        stride_per_key_per_rank=[[i + 2] for i in range(len(keys))],
        inverse_indices=(keys, inverse),
    )
    padded = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.tensor(lengths))
    return vbe, padded


def with_other_keys(kjt: KeyedJaggedTensor, gen: torch.Generator) -> KeyedJaggedTensor:
    """``kjt`` with another module's feature "x" first (ids no table of ours could hold) and its
    own features in reverse order."""
    per = kjt.to_dict()
    x_lengths = torch.randint(0, 4, (kjt.stride(),), generator=gen)
    x = torch.randint(10**6, 10**7, (int(x_lengths.sum()),), generator=gen)
    keys = ["x"] + list(reversed(kjt.keys()))
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.cat([x] + [per[f].values() for f in keys[1:]]),
        torch.cat([x_lengths] + [per[f].lengths() for f in keys[1:]]),
    )


def drop_in_kjts(rank: int, world_size: int, kind: str) -> Dict[str, Any]:
    """Train three sharded collections on this rank's slices: as given, with another module's
    key added (keys reordered), and as VBE batches against their padded form. Returns the eval
    outputs and logical states of each, and the error for a VBE KJT without inverse indices."""
    config = dict(num_chunks=4, budget=0.5, prune_interval=2, warmup_steps=0, sample_size=20,
                  learning_rate=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    slices = [rank_slice(k, rank, world_size) for k in global_batches(4, GLOBAL_BATCH)]
    pairs = [vbe_and_padded(k, gen) for k in slices]
    runs = {
        "plain": slices,
        "other_keys": [with_other_keys(k, gen) for k in slices],
        "vbe": [v for v, _ in pairs],
        "padded": [p for _, p in pairs],
    }
    W = loss_weights()
    out: Dict[str, Any] = {}
    for name, batches in runs.items():
        torch.manual_seed(0)
        dmp = _ebc_dmp(kind, world_size, config)
        for kjt in batches:
            values = dmp(kjt).values()
            (values * W[: values.shape[0], : values.shape[1]]).sum().backward()
        state = gather_state_dict(dmp.state_dict())
        out[name] = {"outputs": _eval_outputs(dmp, rank, world_size), "state": state,
                     "steps": dmp.module.steps_done}
    bare = runs["vbe"][0]
    bare = KeyedJaggedTensor(keys=bare.keys(), values=bare.values(), lengths=bare.lengths(),
                             stride_per_key_per_rank=bare.stride_per_key_per_rank())
    try:
        dmp(bare)
        out["bare_vbe_error"] = None
    except ValueError as e:
        out["bare_vbe_error"] = str(e)
    return out


# ---- a 10^9-row table: DCP save and resharded load without anything sized by the id space -------

HUGE_ROWS, HUGE_DIM, HUGE_BATCH = 10**9, 16, 512


def _huge_dmp(kind: str, world_size: int):
    table = EmbeddingBagConfig(
        name="big", num_embeddings=HUGE_ROWS, embedding_dim=HUGE_DIM, feature_names=["f"]
    )
    # miss="zeros": a resharded load restarts the hashed fallback (its rows follow the plan).
    config = FiitedConfig(num_chunks=2, budget=1e-4, prune_interval=5, warmup_steps=0, miss="zeros")
    module = FiitedEmbeddingBagCollection([table], config)
    sharder = FiitedEmbeddingBagCollectionSharder()
    per = {"big": row_wise() if kind == "row_wise" else table_wise(rank=0)}
    plan = construct_module_sharding_plan(
        module, per, world_size=world_size, device_type="cpu", sharder=sharder
    )
    return DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        plan=ShardingPlan({"": plan}), sharders=[sharder],
    )


def _huge_batch(step: int, rank: int, world_size: int) -> KeyedJaggedTensor:
    """This rank's slice of a global batch of skewed ids spread over all 10^9 rows."""
    from torchrec_fiited.store import hash_ids

    g = torch.Generator().manual_seed(1000 + step)
    ranks = torch.exp(torch.rand(HUGE_BATCH, generator=g) * 13.0).long()  # log-uniform to ~4e5
    ids = hash_ids(ranks, HUGE_ROWS)
    b = HUGE_BATCH // world_size
    mine = ids[rank * b : (rank + 1) * b]
    return KeyedJaggedTensor.from_lengths_sync(["f"], mine, torch.ones(b, dtype=torch.int64))


def _huge_outputs(dmp, rank: int, world_size: int) -> torch.Tensor:
    dmp.eval()
    with torch.no_grad():
        mine = dmp(_huge_batch(-1, rank, world_size)).to_dict()["f"]
    dmp.train()
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return torch.cat(every)


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def huge_table_dcp(rank: int, world_size: int, kind: str, path: str, save: bool) -> Dict[str, Any]:
    """Train and save (``save``), or load resharded; outputs on a fixed batch, the peak RSS the
    save or load added, and this rank's FIITED bytes."""
    import torch.distributed.checkpoint as dcp

    from torchrec_fiited.distributed import load_resharded

    dmp = _huge_dmp(kind, world_size)
    sharded = sharded_collection(dmp)
    if save:
        for step in range(12):
            dmp(_huge_batch(step, rank, world_size)).values().sum().backward()
    before = _rss_peak_mb()
    if save:
        dcp.save(dmp.state_dict(), checkpoint_id=path)
    else:
        load_resharded(sharded, path)
    added = _rss_peak_mb() - before
    return {
        "outputs": _huge_outputs(dmp, rank, world_size),
        "rss_added_mb": added,
        "bytes": sum(s["bytes"]["total"] for s in sharded.stats().values()),
        "resident": sum(p["resident_entries"] for s in sharded.stats().values()
                        for p in s["pools"].values()),
    }
