"""export_for_inference: bitwise fp32 parity (absent ids and the hashed fallback included), the
compact key probe, nothing sized by num_embeddings, fp16/int8 bounds, save/load in a fresh
process, input validation and file safety."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.inference import (
    FiitedInferenceEBC,
    InferenceSpec,
    export_for_inference,
    load_inference,
    save_inference,
)
from torchrec_fiited.inference.export import FORMAT
from torchrec_fiited.inference.quantize import dequantize_rows
from torchrec_fiited.ops import hash_reference
from torchrec_fiited.store import entry_key, hash_ids

REPO = Path(__file__).resolve().parents[2]
CFG = dict(num_chunks=2, budget=0.5, prune_interval=3, sample_size=64, decay=0.9,
           enforce_ratio=0.0, learning_rate=0.05, seed=3)
# case -> (pooling, is_weighted, hash_ids, miss)
CASES = {
    "sum": (PoolingType.SUM, False, False, "zeros"),
    "mean": (PoolingType.MEAN, False, False, "zeros"),
    "weighted": (PoolingType.SUM, True, False, "zeros"),
    "hashed_weighted_mean": (PoolingType.MEAN, True, True, "zeros"),
    "fallback_mean": (PoolingType.MEAN, False, False, "hashed"),
    "fallback_hashed_weighted": (PoolingType.SUM, True, True, "hashed"),
}
TRAINING_ONLY = ("utilities", "last_step", "live_mask", "momentum", "free_stack", "num_free",
                 "scores", "sketch", "num_seen", "index")


def _kjt(tables, batch_size, gen, weighted, hashed):
    return random_kjt(tables, batch_size, gen, max_len=5, weighted=weighted,
                      id_range=10**9 if hashed else None)


@functools.lru_cache(maxsize=None)  # export never mutates the module, so tests can share it
def _train(case):
    pooling, weighted, hashed, miss = CASES[case]
    tables = make_tables(pooling)
    cfg = FiitedConfig(**CFG, hash_ids=hashed, miss=miss)
    m = FiitedEmbeddingBagCollection(tables, cfg, is_weighted=weighted)
    gen = torch.Generator().manual_seed(0)
    # Four pruning cycles, then two steps of admissions: entries admitted after the last cycle
    # into a full pool hold no chunk (a cycle erases such entries, so the state would lack them).
    for _ in range(14):
        m(_kjt(tables, 16, gen, weighted, hashed)).values().pow(2).sum().backward()
    return m.eval(), _kjt(tables, 24, gen, weighted, hashed)


def _rows(m, table, ids):
    """Rows int64 [n] of a table's ids, as training resolves them."""
    t = next(t for t in m.embedding_bag_configs() if t.name == table)
    return hash_ids(ids, t.num_embeddings) if m.config.hash_ids else ids.to(torch.int64)


def _id_kinds(m, kjt):
    """Per table: (keys, resident bool, live chunks per id) of the ids of ``kjt``, from the
    training store."""
    per_feature = kjt.to_dict()
    out = {}
    for t in m.embedding_bag_configs():
        for f in t.feature_names:
            keys = m.store.keys(t.name, _rows(m, t.name, per_feature[f].values()))
            et = m.store.entries_of(t.name)
            entries = et.lookup(keys)
            live = (et.chunk_slots[entries] >= 0).sum(1)
            out[f] = (t.name, keys, entries != et.null_entry, live)
    return out


def _count_kinds(m, kjt):
    """Ids of ``kjt`` with a live chunk, resident without one, and absent (no entry)."""
    kinds = _id_kinds(m, kjt).values()
    live = sum(int((r & (n > 0)).sum()) for _, _, r, n in kinds)
    empty = sum(int((r & (n == 0)).sum()) for _, _, r, n in kinds)
    absent = sum(int((~r).sum()) for _, _, r, _ in kinds)
    return live, empty, absent


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    m, kjt = _train(request.param)
    return request.param, m, kjt


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def test_fp32_export_is_bitwise_equal_to_training_eval(trained):
    case, m, kjt = trained
    slots = torch.cat([et.chunk_slots[et.seen()] for et in m.store.entries.values()])
    live_per_entry = (slots >= 0).sum(1)
    assert bool((live_per_entry == 0).any()) and bool((live_per_entry == 1).any())  # pruning ran
    # The batch reads live chunks, resident entries without one (zeros, even with a fallback)
    # and ids without an entry (zeros, or the fallback).
    live, empty, absent = _count_kinds(m, kjt)
    assert live > 0 and empty > 0 and absent > 0
    if m.config.miss == "hashed":  # ... which read the fallback, not zeros
        assert m.store.fallbacks and all(fb.rows > 0 for fb in m.store.fallbacks.values())
    before = _state(m)
    served = export_for_inference(m)
    expected = m(kjt)
    got = served(kjt)
    assert isinstance(served, FiitedInferenceEBC) and not served.training
    assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
    assert torch.equal(got.values(), expected.values()), case
    for k, v in m.state_dict().items():  # the training module is untouched
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def _served_rows(served, m, table, rows):
    """Probe slot int64 [n] of global ``rows`` of ``table`` in the served module (-1: absent),
    through the reference lookup (not the module's own code path)."""
    spec_pool = next(p for p in served.spec.pools if p.name == m.store.layouts[table].pool)
    keys = entry_key(m.store.layouts[table].table_index, rows)
    return hash_reference.lookup(served.pools[spec_pool.name].keys, spec_pool.bucket_size, keys)


def test_export_keeps_only_compacted_serving_state(trained):
    _, m, _ = trained
    served = export_for_inference(m)
    assert not [k for k in served.state_dict() if any(s in k for s in TRAINING_ONLY)]
    K = m.config.num_chunks
    for pool in m.store.pools:
        et = m.store.entries[pool]
        entries = et.seen()
        keys, old = et.keys_of(entries), et.chunk_slots[entries]
        # Served keys: resident with a live chunk, or any resident key of a fallback table.
        fallback = torch.tensor([m.store.layouts[t].table_index for t in m.store.fallbacks
                                 if m.store.layouts[t].pool == pool], dtype=torch.int64)
        want = keys[(old >= 0).any(1) | torch.isin(keys >> 56, fallback)]
        probe = served.pools[pool].keys
        got = probe[probe != hash_reference.EMPTY_KEY]
        assert torch.equal(got.sort().values, want.sort().values), pool
        spec = next(p for p in served.spec.pools if p.name == pool)
        assert probe.numel() == spec.slots and want.numel() <= 0.5 * spec.slots  # load <= 1/2
        assert served.pools[pool].chunk_slots.shape == (spec.slots + 1, K)
        assert bool((served.pools[pool].chunk_slots[-1] == -1).all())  # the null row
        new = served.pools[pool].chunk_slots
        new = new[new >= 0]
        n_live = int((old >= 0).sum())
        assert served.pools[pool].weights.shape[0] == n_live == new.numel()
        assert torch.equal(new.sort().values.long(), torch.arange(n_live))  # slots 0..n_live-1
    for name, dense in m.dense_weights().items():  # same logical tables after renumbering
        pool = served.pools[m.store.layouts[name].pool]
        found = _served_rows(served, m, name, torch.arange(dense.shape[0]))
        slots = pool.chunk_slots[torch.where(found >= 0, found, pool.chunk_slots.shape[0] - 1)].long()
        rebuilt = (pool.weights[slots.clamp(min=0)] * (slots >= 0).unsqueeze(-1)).reshape(dense.shape)
        assert torch.equal(rebuilt, dense), name
    for name, fb in m.store.fallbacks.items():
        assert torch.equal(served.fallbacks[name].weights, fb.weights), name
    assert set(served.fallbacks.keys()) == set(m.store.fallbacks.keys())
    # nbytes: every tensor the module holds, by component.
    parts = served.nbytes_by_component()
    held = sum(b.numel() * b.element_size() for b in served.buffers())
    held += sum(c.numel() * c.element_size() for c in served._stored_columns.values())
    assert parts["total"] == served.nbytes() == held == sum(
        v for k, v in parts.items() if k != "total")
    assert parts["keys"] == 8 * sum(p.slots for p in served.spec.pools)
    assert parts["fallback"] == sum(4 * fb.weights.numel() for fb in m.store.fallbacks.values())
    training_bytes = sum(b.numel() * b.element_size() for b in m.buffers())
    assert served.nbytes() < training_bytes
    # int8 rows cost cs + 8 bytes: below fp32's 4 cs here, below fp16's 2 cs only once cs > 8.
    assert export_for_inference(m, "int8").nbytes() < served.nbytes()
    assert export_for_inference(m, "fp16").nbytes() < served.nbytes()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_untrained_module_exports_empty_pools_reading_zeros(dtype):
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(**CFG)).eval()
    kjt = random_kjt(make_tables(), 4, torch.Generator().manual_seed(0))
    served = export_for_inference(m, dtype)
    assert all(p.weights.shape[0] == 0 for p in served.pools.values())
    assert all(bool((p.keys == hash_reference.EMPTY_KEY).all()) for p in served.pools.values())
    assert torch.equal(served(kjt).values(), m(kjt).values())
    assert not bool(served(kjt).values().any())


def test_int8_rows_are_fused_rowwise_with_fp32_scale_and_bias(trained):
    _, m, _ = trained
    fp32, int8 = export_for_inference(m), export_for_inference(m, "int8")
    for name, pool in fp32.pools.items():
        x, q = pool.weights, int8.pools[name].weights
        assert q.dtype == torch.uint8 and q.shape == (x.shape[0], x.shape[1] + 8)
        scale_bias = q[:, -8:].contiguous().view(torch.float32)  # [n, 2]
        assert torch.equal(scale_bias[:, 1], x.amin(1))  # bias = row min, kept exactly
        half_step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 510
        assert bool(((dequantize_rows(q, "int8") - x).abs() <= half_step + 1e-7).all()), name
    for name, fb in fp32.fallbacks.items():  # the fallback rows: one scale and bias per row
        x, q = fb.weights, int8.fallbacks[name].weights
        assert q.dtype == torch.uint8 and q.shape == (x.shape[0], x.shape[1] + 8)
        half_step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 510
        assert bool(((dequantize_rows(q, "int8") - x).abs() <= half_step + 1e-7).all()), name


def _pooled_bound(m, kjt, per_element, per_fallback):
    """Bound [B, sum D] from per-element error tables: [E, D] per table for ids with an entry,
    [H, D] per fallback table for ids without one (zeros without a fallback):
    sum_i |w_i| err(i)."""
    weighted = m.is_weighted()
    per_feature = kjt.to_dict()
    kinds = _id_kinds(m, kjt)
    outs = []
    for t in m.embedding_bag_configs():
        for f in t.feature_names:
            jt = per_feature[f]
            _, keys, resident, _ = kinds[f]
            err = per_element[t.name][_rows(m, t.name, jt.values())]
            if t.name in m.store.fallbacks:
                fb_err = per_fallback[t.name][m.store.fallbacks[t.name].rows_of(keys)]
                err = torch.where(resident.unsqueeze(1), err, fb_err)
            else:
                err = err * resident.unsqueeze(1)
            w = jt.weights().abs() if weighted else None
            b = F.embedding_bag(torch.arange(err.shape[0]), err, jt.offsets(), mode="sum",
                                per_sample_weights=w, include_last_offset=True)
            if t.pooling == PoolingType.MEAN:
                b = b / jt.lengths().clamp(min=1).unsqueeze(1)
            outs.append(b)
    return torch.cat(outs, dim=1)


def _int8_error_table(dense, K):
    chunks = dense.reshape(dense.shape[0], K, -1)
    err = (chunks.amax(-1, keepdim=True) - chunks.amin(-1, keepdim=True)) / 510  # scale / 2
    return err.expand_as(chunks).reshape(dense.shape)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantized_outputs_within_documented_bounds(trained, dtype):
    _, m, kjt = trained
    K = m.config.num_chunks
    fallbacks = {n: fb.weights for n, fb in m.store.fallbacks.items()}
    if dtype == "int8":
        per_element = {n: _int8_error_table(d, K) for n, d in m.dense_weights().items()}
        per_fallback = {n: _int8_error_table(w, 1) for n, w in fallbacks.items()}
    else:
        per_element = {n: d.abs() * 2.0**-11 for n, d in m.dense_weights().items()}
        per_fallback = {n: w.abs() * 2.0**-11 for n, w in fallbacks.items()}
    bound = _pooled_bound(m, kjt, per_element, per_fallback)
    err = (export_for_inference(m, dtype)(kjt).values() - m(kjt).values()).abs()
    # Slack: fp32 accumulation rounding and fp16 subnormals (2^-25 absolute).
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all()), float((err - bound).max())
    assert float(err.max()) > 0  # it really is quantized


# ---- DLRM, save/load in a fresh process --------------------------------------------------------

_LOADER = """
import json, sys
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec_fiited.inference import load_inference

for job in json.loads(sys.argv[1]):
    model = load_inference(job["model"])
    req = torch.load(job["request"], weights_only=True)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=req["keys"], values=req["values"], lengths=req["lengths"], weights=req.get("weights"))
    with torch.no_grad():
        out = model(req["dense"], kjt) if "dense" in req else model(kjt).values()
    torch.save(out, job["out"])
"""


def _dlrm_tables():
    return [EmbeddingBagConfig(name=f"d{i}", embedding_dim=8, num_embeddings=30,
                               feature_names=[f"g{i}"]) for i in range(3)]


def _trained_dlrm():
    torch.manual_seed(0)
    tables = _dlrm_tables()
    ebc = FiitedEmbeddingBagCollection(tables, FiitedConfig(**CFG))
    dlrm = DLRM(ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
    opt = torch.optim.SGD(dlrm.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        kjt = random_kjt(tables, 16, gen, max_len=4)
        logits = dlrm(torch.rand(16, 4, generator=gen), kjt).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, torch.rand(16, generator=gen).round())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dlrm.eval(), random_kjt(tables, 12, gen, max_len=4), torch.rand(12, 4, generator=gen)


def _request(path, kjt, dense=None):
    req = {"keys": kjt.keys(), "values": kjt.values(), "lengths": kjt.lengths()}
    if kjt.weights_or_none() is not None:
        req["weights"] = kjt.weights()
    if dense is not None:
        req["dense"] = dense
    torch.save(req, path)
    return str(path)


def test_dlrm_export_then_load_in_fresh_process(tmp_path):
    dlrm, kjt, dense = _trained_dlrm()
    live, _, absent = _count_kinds(dlrm.sparse_arch.embedding_bag_collection, kjt)
    assert live > 0 and absent > 0  # the request reads chunks and ids without an entry (zeros)
    with torch.no_grad():
        expected = dlrm(dense, kjt)
        served = {dt: export_for_inference(dlrm, dt) for dt in ("fp32", "int8")}
        outs = {dt: s(dense, kjt) for dt, s in served.items()}
    assert isinstance(served["fp32"].sparse_arch.embedding_bag_collection, FiitedInferenceEBC)
    assert torch.equal(outs["fp32"], expected)
    assert float((outs["int8"] - expected).abs().max()) < 1e-2

    ebc_case, ebc_kjt = _train("weighted")
    ebc_served = export_for_inference(ebc_case, "fp16")
    ebc_expected = ebc_served(ebc_kjt).values()
    jobs = []
    for name, module, request in [
        ("dlrm_fp32", served["fp32"], _request(tmp_path / "r.pt", kjt, dense)),
        ("dlrm_int8", served["int8"], _request(tmp_path / "r.pt", kjt, dense)),
        ("ebc_fp16", ebc_served, _request(tmp_path / "r_ebc.pt", ebc_kjt)),
    ]:
        save_inference(module, tmp_path / f"{name}.pt")
        jobs.append({"model": str(tmp_path / f"{name}.pt"), "request": request,
                     "out": str(tmp_path / f"{name}.out")})
    script = tmp_path / "serve.py"
    script.write_text(_LOADER)
    env = {**os.environ, "TORCHREC_FIITED_NATIVE": os.environ.get("TORCHREC_FIITED_NATIVE", "0")}
    proc = subprocess.run([sys.executable, str(script), json.dumps(jobs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda name: torch.load(tmp_path / f"{name}.out", weights_only=True)  # noqa: E731
    assert torch.equal(load("dlrm_fp32"), expected)
    assert torch.equal(load("dlrm_int8"), outs["int8"])
    assert torch.equal(load("ebc_fp16"), ebc_expected)
    blob = torch.load(tmp_path / "dlrm_fp32.pt", weights_only=True)
    assert not [k for k in blob["state_dict"] if any(s in k for s in TRAINING_ONLY)]


def test_load_in_process_round_trip_and_spec(tmp_path, trained):
    _, m, kjt = trained
    served = export_for_inference(m, "int8")
    save_inference(served, tmp_path / "m.pt")
    loaded = load_inference(tmp_path / "m.pt")
    assert loaded.spec == served.spec == InferenceSpec.from_dict(served.spec.to_dict())
    assert torch.equal(loaded(kjt).values(), served(kjt).values())


# ---- validation and file safety ----------------------------------------------------------------


def test_bad_ids_and_keys_raise_naming_the_feature():
    m, kjt = _train("sum")
    served = export_for_inference(m)
    values = kjt.values().clone()
    f2 = kjt.keys().index("f2")
    start = int(kjt.offsets()[f2 * kjt.stride()])
    values[start] = 20  # t1 has 20 rows
    bad = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    with pytest.raises(ValueError, match=r"feature 'f2' \(table 't1'\): id 20 outside \[0, 20\)"):
        served(bad)
    renamed = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2", "fx"], values=kjt.values(), lengths=kjt.lengths())
    with pytest.raises(ValueError, match=r"missing \['f3'\]"):  # fx: another module's, ignored
        served(renamed)
    weighted, wkjt = _train("weighted")
    unweighted = KeyedJaggedTensor.from_lengths_sync(keys=wkjt.keys(), values=wkjt.values(),
                                                     lengths=wkjt.lengths())
    with pytest.raises(ValueError, match="is_weighted=True"):
        export_for_inference(weighted)(unweighted)


def test_bad_arguments_raise():
    m, _ = _train("sum")
    with pytest.raises(ValueError, match=r"dtype must be one of \['fp32', 'fp16', 'int8'\], got 'bf16'"):
        export_for_inference(m, "bf16")
    with pytest.raises(ValueError, match="Linear holds no FiitedEmbeddingBagCollection"):
        export_for_inference(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="export_for_inference first"):
        save_inference(torch.nn.Sequential(m), "/nonexistent/never_written.pt")
    spec = export_for_inference(m).spec
    t0, t2 = spec.tables[0], spec.tables[2]  # t0 and t2 share pool shared_cs4
    assert t0.pool == t2.pool and t0.table_index != t2.table_index
    clash = tuple(dataclasses.replace(t, table_index=t0.table_index) if t is t2 else t
                  for t in spec.tables)
    with pytest.raises(ValueError, match="tables 't0' and 't2' share pool 'shared_cs4' and table_index"):
        dataclasses.replace(spec, tables=clash)


def test_load_corrupt_file_raises_naming_the_path(tmp_path):
    m, _ = _train("sum")
    good = tmp_path / "good.pt"
    save_inference(export_for_inference(m), good)
    data = good.read_bytes()
    cases = {
        "garbage.pt": b"not a model at all",
        "truncated.pt": data[: len(data) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name in [*cases, "other.pt"]:
        path = tmp_path / name
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_inference(path)


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    m, kjt = _train("sum")
    served = export_for_inference(m)
    path = tmp_path / "served.pt"
    save_inference(served, path)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_inference(export_for_inference(m, "int8"), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served.pt"]  # no temp file left
    assert torch.equal(load_inference(path)(kjt).values(), served(kjt).values())


def test_public_classes_have_docstrings():
    for cls in (FiitedInferenceEBC, InferenceSpec):
        assert cls.__doc__ and cls.__doc__.strip()
    assert "Example" in FiitedInferenceEBC.__doc__ and "Example" in export_for_inference.__doc__


def test_old_and_unknown_file_versions_are_refused(tmp_path):
    m, _ = _train("sum")
    good = tmp_path / "good.pt"
    save_inference(export_for_inference(m), good)
    blob = torch.load(good, weights_only=True)
    assert blob["format"] == FORMAT and blob["version"] == 3
    for version, message in ((1, r"version 1 \(store v1: per-row chunk_slots \[E, K\]\) is no "
                                 r"longer supported.*Re-export"),
                             (2, r"version 2 read its hashed fallbacks by mix64.*Re-export"),
                             (4, r"version 4 vs supported 3")):
        path = tmp_path / f"v{version}.pt"
        torch.save({**blob, "version": version}, path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            load_inference(path)


def test_load_refuses_tensors_that_break_the_probe_layout(tmp_path):
    m, _ = _train("weighted")
    good = tmp_path / "good.pt"
    save_inference(export_for_inference(m), good)
    blob = torch.load(good, weights_only=True)
    spec = json.loads(blob["structure"])["spec"]
    pool, W = next((p["name"], p["bucket_size"]) for p in spec["pools"] if p["num_buckets"] > 1)
    keys, slots = blob["state_dict"][f"pools.{pool}.keys"], blob["state_dict"][f"pools.{pool}.chunk_slots"]
    empty = keys == hash_reference.EMPTY_KEY
    held = (~empty).nonzero().squeeze(1)
    s = int(held[0])
    other = int((empty & (torch.arange(keys.numel()) // W != s // W)).nonzero()[0])
    moved = keys.clone()  # a key (and its chunks) moved to a free slot of another bucket
    moved[other], moved[s] = keys[s], hash_reference.EMPTY_KEY
    moved_slots = slots.clone()
    moved_slots[other], moved_slots[s] = slots[s], -1
    out_of_range = slots.clone()
    out_of_range[held[0], 0] = blob["state_dict"][f"pools.{pool}.weights"].shape[0]
    null_row = slots.clone()
    null_row[-1, 0] = 0
    cases = {
        "bucket": ({f"pools.{pool}.keys": moved, f"pools.{pool}.chunk_slots": moved_slots},
                   "a key sits outside its hash bucket"),
        "range": ({f"pools.{pool}.chunk_slots": out_of_range}, r"chunk_slots outside \[-1, "),
        "null": ({f"pools.{pool}.chunk_slots": null_row},
                 "the null row or an empty probe slot holds chunks"),
    }
    for name, (change, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({**blob, "state_dict": {**blob["state_dict"], **change}}, path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + f".*pool '{pool}': .*{message}"):
            load_inference(path)
    load_inference(good)  # the untouched file loads


@pytest.mark.parametrize("miss", ["zeros", "hashed"])
def test_billion_row_table_exports_and_serves_with_nothing_sized_by_num_embeddings(miss, tmp_path):
    E = 10**9
    tables = [EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=E, feature_names=["f"]),
              EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=50, feature_names=["g"])]
    cfg = FiitedConfig(num_chunks=2, budget=2e-6, prune_interval=3, sample_size=64,
                       enforce_ratio=0.0, learning_rate=0.05, seed=3, miss=miss)
    m = FiitedEmbeddingBagCollection(tables, cfg)
    gen = torch.Generator().manual_seed(0)
    hot = torch.randint(0, E, (300,), generator=gen)  # ids worth an entry

    def batch(B):
        ids = torch.where(torch.rand(B * 3, generator=gen) < 0.8,
                          hot[torch.randint(0, 300, (B * 3,), generator=gen)],
                          torch.randint(0, E, (B * 3,), generator=gen))
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["f", "g"], values=torch.cat([ids, torch.randint(0, 50, (B,), generator=gen)]),
            lengths=torch.cat([torch.full((B,), 3), torch.ones(B, dtype=torch.int64)]))

    for _ in range(9):
        m(batch(64)).values().pow(2).sum().backward()
    m.eval()
    kjt = batch(64)
    live, _, absent = _count_kinds(m, kjt)
    assert live > 0 and absent > 0
    expected = m(kjt).values()
    assert bool(expected.any())
    limit = 10**6  # E is 10^9: any tensor sized by it would be far above this
    for dtype in ("fp32", "fp16", "int8"):
        served = export_for_inference(m, dtype)
        tensors = dict(served.named_buffers())
        assert all(max(t.shape, default=0) < limit for t in tensors.values()), {
            k: tuple(t.shape) for k, t in tensors.items()}
        assert served.nbytes() < 10**6
        got = served(kjt).values()
        if dtype == "fp32":
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
    save_inference(served, tmp_path / "big.pt")
    assert torch.equal(load_inference(tmp_path / "big.pt")(kjt).values(), served(kjt).values())
