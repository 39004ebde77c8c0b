"""Issue 11, acceptance 1 (store v2): a property test over random batches, pruning cycles,
admissions, fallbacks and checkpoint round trips.

At every step, for budgets 0.5 down to 0.001 and id spaces from 10 to 10^7 rows:
* the module's tensors (every byte: chunks, optimizer state, entries, sketch, fallback,
  counters) are ``stats()["bytes"]["total"]`` and at most budget x full bytes, per pool and in
  total, and use all of it but less than a chunk slot per pool;
* no key is resident twice, every live chunk holds exactly one slot and every slot is live or
  free exactly once (checked here, and by ``store.invariant_errors()``);
* an eval forward reads, for each id, its entry's live chunks if its key is resident, else
  zeros (``miss="zeros"``) or its hashed fallback row (``miss="hashed"``), computed here from
  the raw tensors (key layout and fallback hash re-implemented);
* right after a pruning cycle, every resident entry of a pool with a sketch holds a live chunk
  (the cycle erased the others); a pool without a sketch never loses a resident key;
* a state_dict loaded into a fresh module mid-run continues bitwise equal to the original.
"""

import math

import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.store import row_permutation
from torchrec_fiited.store.sizing import default_entries_per_slot, entry_bytes, slot_bytes

BUDGETS = [0.5, 0.2, 0.05, 0.01, 0.002, 0.001]
EMPTY = -(2**63)
TRAIN_BATCH, EVAL_BATCH, PROBES = 64, 8, 24
# Mean ids per bag of each table's features in training batches: the large tables see hundreds
# of new ids per step, so small pools fill within a few steps and admission, eviction and
# erasure all run.
MEAN_LENGTH = {"tiny": 1, "small": 3, "large": 12, "mid": 6}


def _full_row_bytes(dim: int, optimizer: str) -> int:
    state = {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1}[optimizer]
    return 4 * (dim + state)


def _tables(budget: float, bytes_a: int, bytes_b: int, optimizer: str):
    """Pool A (D=8): 10, 1000 and L rows; pool B (D=16, MEAN): M rows. L and M are chosen so
    that each pool holds about ``bytes_*`` at ``budget`` (so small budgets get 10^7-row tables
    without the test allocating hundreds of MB at large ones)."""
    L = int(min(10**7, max(2_000, bytes_a / (budget * _full_row_bytes(8, optimizer)))))
    M = int(min(10**7, max(2_000, bytes_b / (budget * _full_row_bytes(16, optimizer)))))
    return [
        EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["tiny"]),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=1_000,
                           feature_names=["small_a", "small_b"]),
        EmbeddingBagConfig(name="large", embedding_dim=8, num_embeddings=L, feature_names=["large"]),
        EmbeddingBagConfig(name="mid", embedding_dim=16, num_embeddings=M, feature_names=["mid"],
                           pooling=PoolingType.MEAN),
    ]


def _zipf_ids(E: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Zipf-like (log-uniform rank, P(rank r) ~ 1/r) ids of a table of E rows, ranks scattered
    over the id space."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    rank = (torch.floor(torch.exp(u * math.log(E + 1))) - 1).clamp(0, E - 1).to(torch.int64)
    return (rank * 2654435761 + 977) % E


def _batch(tables, gen, one_id_per_bag: bool = False, batch: int = TRAIN_BATCH) -> KeyedJaggedTensor:
    keys, values, lengths = [], [], []
    for t in tables:
        for f in t.feature_names:
            if one_id_per_bag:  # probes: 2/3 from the training distribution, 1/3 uniform
                lens = torch.ones(PROBES, dtype=torch.int64)
                ids = torch.cat([_zipf_ids(t.num_embeddings, 2 * PROBES // 3, gen),
                                 torch.randint(0, t.num_embeddings, (PROBES // 3,), generator=gen)])
            else:
                lens = torch.randint(0, 2 * MEAN_LENGTH[t.name] + 1, (batch,), generator=gen)
                ids = _zipf_ids(t.num_embeddings, int(lens.sum()), gen)
            keys.append(f)
            lengths.append(lens)
            values.append(ids)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def _fallback_row(row: int, num_rows: int, width: int) -> int:
    """The bucket of the permuted row (row_permutation has its own pinned-value test)."""
    return int(row_permutation(torch.tensor([row]), num_rows)[0]) // width


def _expected_reads(m, tables, kjt) -> dict:
    """Per feature, fp32 [n, D]: what each id of ``kjt`` reads, from the raw tensors."""
    store, K = m.store, m.config.num_chunks
    resident = {}
    for pool, et in store.entries.items():
        resident[pool] = {k: e for e, k in enumerate(et.index.keys.tolist()) if k != EMPTY}
    out = {}
    per_feature = kjt.to_dict()
    for index, t in enumerate(tables):
        pool = store.layouts[t.name].pool
        et, cp = store.entries[pool], store.pools[pool]
        cs = t.embedding_dim // K
        for f in t.feature_names:
            rows = []
            for row in per_feature[f].values().tolist():
                key = index << 56 | row
                e = resident[pool].get(key)
                if e is not None:
                    slots = et.chunk_slots[e].tolist()
                    rows.append(torch.cat([cp.weights[s] if s >= 0 else torch.zeros(cs) for s in slots]))
                elif t.name in store.fallbacks:
                    fb = store.fallbacks[t.name]
                    rows.append(fb.weights[_fallback_row(row, t.num_embeddings, fb.grid.width)])
                else:
                    rows.append(torch.zeros(t.embedding_dim))
            out[f] = torch.stack(rows) if rows else torch.zeros(0, t.embedding_dim)
    return out


def _check_reads(m, tables, gen) -> None:
    """Eval forward of one-id bags equals each id's read exactly; of a random batch, the pooled
    reads."""
    was_training = m.training
    m.eval()
    probe = _batch(tables, gen, one_id_per_bag=True)
    got = m(probe).to_dict()
    want = _expected_reads(m, tables, probe)
    for f, w in want.items():
        assert torch.equal(got[f], w), f
    kjt = _batch(tables, gen, batch=EVAL_BATCH)
    got = m(kjt).to_dict()
    want = _expected_reads(m, tables, kjt)
    for t in tables:
        for f in t.feature_names:
            lengths = kjt.to_dict()[f].lengths()
            bag = torch.repeat_interleave(torch.arange(EVAL_BATCH), lengths)
            pooled = torch.zeros(EVAL_BATCH, t.embedding_dim).index_add_(0, bag, want[f])
            if t.pooling == PoolingType.MEAN:
                pooled = pooled / lengths.clamp(min=1).unsqueeze(1)
            torch.testing.assert_close(got[f], pooled, rtol=1e-5, atol=1e-6)
    m.train(was_training)


def _pool_bytes(m) -> dict:
    """Bytes of the module's tensors per pool (steps_done charged to each), from the buffers."""
    store = m.store
    out = {p: 0 for p in store.pools}
    owner = {}
    for p in store.pools:
        owner.update({f"store.pools.{p}.": p, f"store.entries.{p}.": p, f"store.sketches.{p}.": p})
        owner.update({f"store.fallbacks.{t}.": p for t in store.tables_of_pool(p)})
    steps = 0
    for name, t in list(m.named_buffers()) + list(m.named_parameters()):
        b = t.numel() * t.element_size()
        if name == "steps_done":
            steps = b
            continue
        pools = [p for prefix, p in owner.items() if name.startswith(prefix)]
        assert len(pools) == 1, name  # every tensor belongs to exactly one pool
        out[pools[0]] += b
    return {p: b + steps for p, b in out.items()}


def _check_bytes(m, tables, budget: float) -> None:
    opt = m.config.optimizer
    s = m.stats()
    total = sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
    full = {}
    for t in tables:
        pool = m.store.layouts[t.name].pool
        full[pool] = full.get(pool, 0) + t.num_embeddings * _full_row_bytes(t.embedding_dim, opt)
    assert s["bytes_full"] == sum(full.values())
    assert s["bytes"]["total"] == total <= budget * s["bytes_full"]
    for pool, b in _pool_bytes(m).items():
        slot = slot_bytes(m.store.pools[pool].chunk_size, opt, m.store.pools[pool].capacity)
        K = m.store.num_chunks
        unspent = max(slot, 4 * 2 * K)  # a slot, or a sketch column (depth 2 x K floats)
        if m.store.sketches[pool].width == 0:  # no sketch takes what whole buckets leave over
            W = m.store.entries[pool].index.bucket_size
            alpha = m.config.entries_per_slot or default_entries_per_slot(K)
            unspent += W * (entry_bytes(K, m.store.pools[pool].capacity) + slot / alpha)
        assert budget * full[pool] - unspent < b <= budget * full[pool], (pool, b, budget * full[pool])


def _check_store(m) -> None:
    store = m.store
    for pool, et in store.entries.items():
        keys = et.index.keys
        resident = keys != EMPTY
        assert torch.unique(keys[resident]).numel() == int(resident.sum()), "a key resident twice"
        assert bool((et.utilities[:-1][~resident] == 0).all()), "a free entry holds utilities"
        cs = et.chunk_slots.to(torch.int64)
        assert bool((cs[-1] == -1).all()) and bool((cs[:-1][~resident] == -1).all())
        cp = store.pools[pool]
        live = cs[cs >= 0]
        free = cp.free_stack[: int(cp.num_free)].to(torch.int64)
        refs = torch.sort(torch.cat([live, free])).values
        assert torch.equal(refs, torch.arange(cp.capacity)), f"pool {pool}: slots not live or free exactly once"
        assert torch.equal((cs[:-1] >= 0).sum(0), cp.live_per_chunk)
    assert store.invariant_errors() == []


def _check_erased_after_cycle(m) -> None:
    for pool, et in m.store.entries.items():
        if m.store.sketches[pool].width == 0:
            continue
        resident = et.index.keys != EMPTY
        holds = (et.chunk_slots[:-1] >= 0).any(1)
        assert bool(holds[resident].all()), f"pool {pool}: a chunkless entry survived the cycle"


def _resident_keys(m) -> dict:
    return {p: set(et.index.keys[et.index.keys != EMPTY].tolist()) for p, et in m.store.entries.items()}


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb[k]), k
        else:
            assert v == sb[k], k


OPS = st.lists(st.sampled_from(["train"] * 5 + ["eval", "prune", "roundtrip"]), min_size=4, max_size=14)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(budget=0.001, bytes_a=400_000, bytes_b=60_000, num_chunks=4, miss="hashed",
         ratio_mode="manual", optimizer="rowwise_adagrad", sketch_fraction=0.05, prune_interval=2,
         ops=["train", "train", "roundtrip", "train", "eval", "train", "prune", "train"], seed=1)
@example(budget=0.5, bytes_a=40_000, bytes_b=40_000, num_chunks=1, miss="zeros",
         ratio_mode="dynamic", optimizer="adagrad", sketch_fraction=0.0, prune_interval=2,
         ops=["train", "train", "train", "roundtrip", "train", "prune", "eval"], seed=2)
@given(
    budget=st.sampled_from(BUDGETS),
    bytes_a=st.integers(8_000, 400_000),
    bytes_b=st.integers(8_000, 100_000),
    num_chunks=st.sampled_from([1, 2, 4]),
    miss=st.sampled_from(["zeros", "hashed"]),
    ratio_mode=st.sampled_from(["manual", "dynamic"]),
    optimizer=st.sampled_from(["rowwise_adagrad", "sgd", "adagrad"]),
    sketch_fraction=st.sampled_from([0.05, 0.05, 0.0]),
    prune_interval=st.integers(1, 3),
    ops=OPS,
    seed=st.integers(0, 2**16),
)
def test_store_v2_properties(budget, bytes_a, bytes_b, num_chunks, miss, ratio_mode, optimizer,
                             sketch_fraction, prune_interval, ops, seed):
    tables = _tables(budget, bytes_a, bytes_b, optimizer)
    cfg = FiitedConfig(num_chunks=num_chunks, budget=budget, miss=miss, ratio_mode=ratio_mode,
                       optimizer=optimizer, sketch_fraction=sketch_fraction,
                       prune_interval=prune_interval, sample_size=64, enforce_ratio=0.02,
                       decay=0.9, learning_rate=0.05, seed=seed)
    models = [FiitedEmbeddingBagCollection(tables, cfg)]
    if miss == "hashed":
        assert "large" in models[0].store.fallbacks  # the fallback path is exercised
    no_sketch = [p for p, sk in models[0].store.sketches.items() if sk.width == 0]
    assert bool(no_sketch) == (sketch_fraction == 0.0)
    gen = torch.Generator().manual_seed(seed)
    resident = _resident_keys(models[0])
    for op in ops:
        cycle = op == "prune"
        if op == "train":
            kjt = _batch(tables, gen)
            outs = [m(kjt).values() for m in models]
            for o in outs[1:]:
                assert torch.equal(o, outs[0])
            C = torch.randn(outs[0].shape, generator=gen)
            for o in outs:
                (o * C).sum().backward()
            cycle = int(models[0].steps_done) % prune_interval == 0
        elif op == "prune":
            reports = [m.prune() for m in models]
            assert all(r == reports[0] for r in reports)
        elif op == "eval":  # reads only: every copy answers alike
            kjt = _batch(tables, gen, batch=EVAL_BATCH)
            outs = []
            for m in models:
                m.eval()
                outs.append(m(kjt).values())
                m.train()
            for o in outs[1:]:
                assert torch.equal(o, outs[0])
        else:  # checkpoint round trip into a fresh module; both go on from here
            fresh = FiitedEmbeddingBagCollection(tables, cfg)
            fresh.load_state_dict(models[0].state_dict())
            models = [models[0], fresh]
        m = models[0]
        _check_bytes(m, tables, budget)
        _check_store(m)
        _check_reads(m, tables, gen)
        if cycle:
            _check_erased_after_cycle(m)
        now = _resident_keys(m)
        for p in no_sketch:  # no sketch: nothing is erased or displaced
            assert resident[p] <= now[p], p
        resident = now
    for other in models[1:]:
        _assert_same_state(models[0], other)
