"""What every re-indexing baseline shares: EBC contract, id checks, bytes, DLRM training,
state-dict round trip (one parametrized suite over hash, QR and the frequency oracle)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
from torchrec_fiited.app.embeddings import embedding_bytes
from torchrec_fiited.app.model import build_dlrm, dense_parameters
from torchrec_fiited.baselines import (
    FreqOracleEmbeddingBagCollection,
    HashedEmbeddingBagCollection,
    QREmbeddingBagCollection,
    RemappedEmbeddingBagCollection,
)


def _uniform_counts(tables, seed=0):
    rng = np.random.default_rng(seed)
    return {f: rng.integers(0, 50, t.num_embeddings) for t in tables for f in t.feature_names}


BUILDERS = {
    "hash": lambda tables, budget, **kw: HashedEmbeddingBagCollection(tables, budget, **kw),
    "freq_oracle": lambda tables, budget, **kw: FreqOracleEmbeddingBagCollection(
        tables, budget, counts=_uniform_counts(tables), **kw),
    "qr": lambda tables, budget, **kw: QREmbeddingBagCollection(tables, budget, **kw),
}


@pytest.fixture(params=sorted(BUILDERS))
def build(request):
    return BUILDERS[request.param]


def test_public_classes_have_docstrings():
    for cls in (RemappedEmbeddingBagCollection, HashedEmbeddingBagCollection,
                FreqOracleEmbeddingBagCollection, QREmbeddingBagCollection):
        assert cls.__doc__ and cls.forward.__doc__


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_output_has_the_original_ebc_layout(build, pooling, gen):
    tables = make_tables(pooling, rows=400)
    module = build(tables, 0.2)
    kjt = random_kjt(tables, 6, gen)
    out, ref = module(kjt), EmbeddingBagCollection(tables)(kjt)
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    assert out.values().shape == ref.values().shape
    assert module.embedding_bag_configs() == tables


def test_ids_outside_the_table_name_the_feature(build):
    tables = make_tables(rows=40)  # t1 (feature f2) has 20 rows
    module = build(tables, 0.5)
    good = torch.tensor([1, 2, 3])
    for bad, shown in ((20, "id 20 outside"), (-1, "id -1 outside")):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2", "f3"], values=torch.cat([good, torch.tensor([bad]), good[:1]]),
            lengths=torch.tensor([1, 1, 1, 0, 1, 0, 0, 1]))
        with pytest.raises(ValueError, match=rf"feature 'f2' \(table 't1'\): {shown} \[0, 20\)"):
            module(kjt)


def test_bytes_are_the_stored_rows_with_their_adagrad_state(build):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([1000, 333])]
    module = build(tables, 0.1)
    # Each stored row: D floats plus row-wise Adagrad's 1 float.
    rows = sum(t.num_embeddings for t in module.stored_configs())
    assert embedding_bytes(module) == rows * 17 * 4
    assert 0.97 * 0.1 * 1333 <= rows <= 0.1 * 1333


@pytest.mark.parametrize("name", ["hash", "freq_oracle"])
def test_row_methods_keep_floor_budget_rows_at_least_one(name):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([1000, 333, 7])]
    # freq_oracle's default ranks the whole collection; scope="table" is the per-table rule.
    module = BUILDERS[name](tables, 0.1, **({"scope": "table"} if name == "freq_oracle" else {}))
    assert [t.num_embeddings for t in module.stored_configs()] == [100, 33, 1]
    assert embedding_bytes(module) == (100 + 33 + 1) * 17 * 4


def _ctr_batch(tables, gen, batch_size=64, num_dense=4):
    kjt = random_kjt(tables, batch_size, gen, max_len=2)
    dense = torch.randn(batch_size, num_dense, generator=gen)
    labels = (torch.rand(batch_size, generator=gen) > 0.5).float()
    return dense, kjt, labels


def test_dlrm_trains_the_stored_tables(build, gen):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([50, 500])]
    module = build(tables, 0.3, lr=0.1)
    model = build_dlrm(module, 4, [8, 8], [8, 1])
    dense_ids = {id(p) for p in dense_parameters(model)}
    assert not any(id(p) in dense_ids for p in module.parameters())
    opt = torch.optim.Adam(dense_parameters(model), lr=0.01)
    before = {n: w.detach().clone() for n, w in module.stored_weights().items()}
    for _ in range(4):
        dense, kjt, labels = _ctr_batch(tables, gen)
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(-1), labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.stored_weights()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert module.fused_optimizer.state_dict()["state"]


def test_state_dict_round_trip(build, gen):
    tables = make_tables(rows=200)
    torch.manual_seed(0)
    trained = build(tables, 0.25, lr=0.1)
    kjt = random_kjt(tables, 8, gen)
    trained(kjt).values().square().sum().backward()  # the fused optimizer steps in backward
    torch.manual_seed(1)
    fresh = build(tables, 0.25, lr=0.1)
    assert not torch.equal(fresh(kjt).values(), trained(kjt).values())
    fresh.load_state_dict(trained.state_dict())
    fresh.fused_optimizer.load_state_dict(trained.fused_optimizer.state_dict())
    torch.testing.assert_close(fresh(kjt).values(), trained(kjt).values())
    for (k, a), (_, b) in zip(sorted(trained.fused_optimizer.state_dict()["state"].items()),
                              sorted(fresh.fused_optimizer.state_dict()["state"].items())):
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=f"{k}.{name}")
