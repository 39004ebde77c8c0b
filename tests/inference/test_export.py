"""export_for_inference: bitwise fp32 parity, compaction, fp16/int8 bounds, save/load in a fresh
process, input validation and file safety."""

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
from torchrec_fiited.inference.quantize import dequantize_rows
from torchrec_fiited.store import hash_ids

REPO = Path(__file__).resolve().parents[2]
CFG = dict(num_chunks=2, budget=0.5, prune_interval=3, sample_size=64, decay=0.9,
           enforce_ratio=0.0, learning_rate=0.05, seed=3)
# case -> (pooling, is_weighted, hash_ids)
CASES = {
    "sum": (PoolingType.SUM, False, False),
    "mean": (PoolingType.MEAN, False, False),
    "weighted": (PoolingType.SUM, True, False),
    "hashed_weighted_mean": (PoolingType.MEAN, True, True),
}
TRAINING_ONLY = ("utilities", "last_step", "live_mask", "momentum", "free_stack", "num_free")


def _kjt(tables, batch_size, gen, weighted, hashed):
    return random_kjt(tables, batch_size, gen, max_len=5, weighted=weighted,
                      id_range=10**9 if hashed else None)


@functools.lru_cache(maxsize=None)  # export never mutates the module, so tests can share it
def _train(case):
    pooling, weighted, hashed = CASES[case]
    tables = make_tables(pooling)
    m = FiitedEmbeddingBagCollection(tables, FiitedConfig(**CFG, hash_ids=hashed), is_weighted=weighted)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):  # four pruning cycles
        m(_kjt(tables, 16, gen, weighted, hashed)).values().pow(2).sum().backward()
    return m.eval(), _kjt(tables, 24, gen, weighted, hashed)


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    m, kjt = _train(request.param)
    return request.param, m, kjt


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def test_fp32_export_is_bitwise_equal_to_training_eval(trained):
    case, m, kjt = trained
    slots = torch.cat([t.chunk_slots for t in m.store.tables.values()])
    live_per_entry = (slots >= 0).sum(1)
    assert bool((live_per_entry == 0).any()) and bool((live_per_entry == 1).any())  # pruning ran
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


def test_export_keeps_only_compacted_serving_state(trained):
    _, m, _ = trained
    served = export_for_inference(m)
    assert not [k for k in served.state_dict() if any(s in k for s in TRAINING_ONLY)]
    for pool in m.store.pools:
        tables = m.store.tables_of_pool(pool)
        new = torch.cat([s[s >= 0] for s in (served.tables[t].chunk_slots for t in tables)])
        n_live = sum(int((m.store.tables[t].chunk_slots >= 0).sum()) for t in tables)
        assert served.pools[pool].weights.shape[0] == n_live == new.numel()
        assert torch.equal(new.sort().values.long(), torch.arange(n_live))  # slots 0..n_live-1
    for name, dense in m.dense_weights().items():  # same logical tables after renumbering
        slots = served.tables[name].chunk_slots.long()
        w = served.pools[m.store.layouts[name].pool].weights
        rebuilt = (w[slots.clamp(min=0)] * (slots >= 0).unsqueeze(-1)).reshape(dense.shape)
        assert torch.equal(rebuilt, dense), name
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


def _pooled_bound(m, kjt, per_element):
    """Bound [B, sum D] from a per-element error table [E, D] per table: sum_i |w_i| err(i)."""
    weighted, hashed = m.is_weighted(), m.config.hash_ids
    per_feature = kjt.to_dict()
    outs = []
    for t in m.embedding_bag_configs():
        for f in t.feature_names:
            jt = per_feature[f]
            entries = hash_ids(jt.values(), t.num_embeddings) if hashed else jt.values()
            w = jt.weights().abs() if weighted else None
            b = F.embedding_bag(entries, per_element[t.name], jt.offsets(), mode="sum",
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
    if dtype == "int8":
        per_element = {n: _int8_error_table(d, K) for n, d in m.dense_weights().items()}
    else:
        per_element = {n: d.abs() * 2.0**-11 for n, d in m.dense_weights().items()}
    bound = _pooled_bound(m, kjt, per_element)
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
    assert bool((dlrm.sparse_arch.embedding_bag_collection.store.tables["d0"].chunk_slots < 0).any())
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
