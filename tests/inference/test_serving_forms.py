"""The exported module in every serving form: TorchScript, torch.export (saved, then loaded in a
fresh process that imports only torchrec and the ops) and torchrec's FX trace, alone and inside
a DLRM; each gives exactly the eager served outputs (the key probe, absent ids and the hashed
fallback included), and the captured forms still reject out-of-range ids."""

import dataclasses

import subprocess
import sys
import textwrap

import pytest
import torch
import torchrec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.inference import export_for_inference, export_program

# TorchScript is deprecated upstream but still what many servers load: tested, its notice muted.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

CFG = FiitedConfig(num_chunks=2, budget=0.5, prune_interval=3, sample_size=16, seed=3)
# The DLRM's dense arch must end at the tables' dim: one dim for every table here.
D = 8


def _tables(pooling=PoolingType.SUM):
    tables = make_tables(pooling)
    for t in tables:
        t.embedding_dim = D
    return tables


def _kjt(B, gen, weighted=False):
    k = random_kjt(_tables(), B, gen, weighted=weighted)
    return KeyedJaggedTensor(keys=k.keys(), values=k.values(), lengths=k.lengths(),
                             weights=k.weights_or_none())


def _trained_ebc(weighted=False, pooling=PoolingType.SUM, miss="zeros"):
    gen = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(CFG, miss=miss)
    m = FiitedEmbeddingBagCollection(_tables(pooling), cfg, is_weighted=weighted)
    for _ in range(7):  # two pruning cycles, then a step of admissions
        m(_kjt(6, gen, weighted)).values().square().sum().backward()
    return m


def _trained_dlrm(miss="zeros"):
    torch.manual_seed(0)
    model = DLRM(_trained_ebc(miss=miss), dense_in_features=3, dense_arch_layer_sizes=[D],
                 over_arch_layer_sizes=[4, 1])
    return model.eval()


def _absent_ids(ebc, kjt):
    """Ids of ``kjt`` without an entry in the training store."""
    per_feature = kjt.to_dict()
    n = 0
    for t in ebc.embedding_bag_configs():
        et = ebc.store.entries_of(t.name)
        for f in t.feature_names:
            n += int((et.lookup(ebc.store.keys(t.name, per_feature[f].values())) == et.null_entry).sum())
    return n


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("weighted, pooling, miss", [
    (False, PoolingType.SUM, "zeros"), (True, PoolingType.MEAN, "zeros"),
    (True, PoolingType.MEAN, "hashed"),
])
def test_script_and_fx_trace_equal_eager(dtype, weighted, pooling, miss, tmp_path):
    trained = _trained_ebc(weighted, pooling, miss)
    served = export_for_inference(trained, dtype)
    assert bool(served.fallbacks) == (miss == "hashed")
    gen = torch.Generator().manual_seed(1)
    scripted = torch.jit.script(served)
    torch.jit.save(scripted, str(tmp_path / "m.pt"))
    reloaded = torch.jit.load(str(tmp_path / "m.pt"))
    traced = torchrec.fx.symbolic_trace(served)
    absent = 0
    for B in (1, 5):
        kjt = _kjt(B, gen, weighted)
        want = served(kjt)
        absent += _absent_ids(trained, kjt)
        if dtype == "fp32":
            assert torch.equal(want.values(), trained.eval()(kjt).values())
        for form in (scripted, reloaded, traced):
            got = form(kjt)
            assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
            assert torch.equal(got.values(), want.values())
    assert absent > 0  # the probe misses too (zeros, or the fallback)


def test_fx_trace_keeps_the_eager_checks():
    traced = torchrec.fx.symbolic_trace(export_for_inference(_trained_ebc()))
    bad = KeyedJaggedTensor(keys=["f0", "f1", "f2", "f3"], values=torch.tensor([0, 1, 99, 2]),
                            lengths=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'f2' \(table 't1'\): id 99 outside"):
        traced(bad)


def test_fx_trace_of_a_dlrm_around_it():
    served = export_for_inference(_trained_dlrm())
    traced = torchrec.fx.symbolic_trace(served)
    gen = torch.Generator().manual_seed(2)
    for B in (1, 7):
        dense, kjt = torch.rand(B, 3, generator=gen), _kjt(B, gen)
        assert torch.equal(traced(dense, kjt), served(dense, kjt))


_FRESH = textwrap.dedent("""
    import sys
    import torch
    import torchrec  # the KJT and KeyedTensor pytree types of the program's signature
    import torchrec_fiited.ops.native as native  # registers torch.ops.fiited.*
    assert native.AVAILABLE
    program = torch.export.load(sys.argv[1])
    cases = torch.load(sys.argv[2])
    for dense, keys, values, lengths, want in cases:
        kjt = torchrec.KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        assert torch.equal(program.module()(dense, kjt), want), len(lengths)
    training = [m for m in sys.modules if m.startswith("torchrec_fiited.") and
                m.split(".")[1] not in ("ops",)]
    assert not training, training
    print("ok", len(cases))
""")


@pytest.mark.parametrize("miss", ["zeros", "hashed"])
def test_torch_export_with_dynamic_shapes_saved_and_loaded_in_a_fresh_process(miss, tmp_path):
    served = export_for_inference(_trained_dlrm(miss))
    assert "fiited.hash_lookup" in str(export_program(
        served.sparse_arch.embedding_bag_collection, (_kjt(2, torch.Generator()),)).graph)
    gen = torch.Generator().manual_seed(3)
    program = export_program(served, (torch.rand(4, 3, generator=gen), _kjt(4, gen)))
    torch.export.save(program, str(tmp_path / "dlrm.pt2"))
    cases = []
    for B in (1, 2, 9):  # other batch sizes and id counts than the example's
        dense, kjt = torch.rand(B, 3, generator=gen), _kjt(B, gen)
        want = served(dense, kjt)
        assert torch.equal(program.module()(dense, kjt), want)
        cases.append((dense, kjt.keys(), kjt.values(), kjt.lengths(), want))
    torch.save(cases, tmp_path / "cases.pt")
    (tmp_path / "serve.py").write_text(_FRESH)
    out = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "dlrm.pt2"),
                          str(tmp_path / "cases.pt")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok 3" in out.stdout, out.stderr[-3000:]


def test_captured_forms_reject_out_of_range_ids(tmp_path):
    served = export_for_inference(_trained_ebc())
    good = _kjt(2, torch.Generator().manual_seed(4))
    program = export_program(served, (good,))
    scripted = torch.jit.script(served)
    for bad_id in (20, -1):  # t1 has 20 rows; a negative id would otherwise wrap into a key
        bad = KeyedJaggedTensor(keys=["f0", "f1", "f2", "f3"], values=torch.tensor([0, 1, bad_id, 2]),
                                lengths=torch.tensor([1, 1, 1, 1]))
        message = r"feature 'f2' \(table 't1'\): an id lies outside \[0, 20\)"
        with pytest.raises(torch.jit.Error, match=message):  # TorchScript's error type
            scripted(bad)
        with pytest.raises(RuntimeError, match=message):
            program.module()(bad)
    assert torch.equal(program.module()(good).values(), served(good).values())
