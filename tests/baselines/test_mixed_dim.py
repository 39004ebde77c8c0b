"""Mixed-Dimension embeddings baseline: dim choice, budget fit, EBC contract, training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from tests.conftest import make_tables, random_kjt
from torchrec_fiited.app.model import build_dlrm, dense_parameters
from torchrec_fiited.baselines import MixedDimEmbeddingBagCollection, feature_popularity, solve_dims

D = 32


def _many_tables(num: int = 12, dim: int = D):
    rows = [10 * 3**i % 5000 + 50 for i in range(num)]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n,
                               feature_names=[f"f{i}"]) for i, n in enumerate(rows)]


def _full_bytes(tables) -> int:
    return sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)


def test_public_classes_have_docstrings():
    assert MixedDimEmbeddingBagCollection.__doc__
    assert feature_popularity.__doc__ and solve_dims.__doc__


@pytest.mark.parametrize("temperature", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_dims_monotone_in_popularity(temperature, budget):
    rng = np.random.default_rng(0)
    pop = rng.uniform(1e-6, 1e-1, size=20)
    dims = solve_dims([1000] * 20, [D] * 20, pop, temperature, budget)
    order = np.argsort(pop)
    assert all(a <= b for a, b in zip(np.asarray(dims)[order], np.asarray(dims)[order][1:]))
    assert all(d % 4 == 0 and 4 <= d <= D for d in dims)
    assert len(set(dims)) > 1  # the rule really skews dims at these settings


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.5, 0.75])
def test_bytes_within_budget_and_near_it(budget):
    tables = _many_tables()
    md = MixedDimEmbeddingBagCollection(tables, budget=budget)
    full = _full_bytes(tables)
    dims = md.dims()
    expected = sum(4 * (t.num_embeddings * dims[t.name] + (dims[t.name] * D if dims[t.name] < D else 0))
                   for t in tables)
    assert md.embedding_bytes() == expected
    assert md.embedding_bytes() <= budget * full
    # 12 tables at 4-wide dim steps: the best fit leaves well under 15% of the budget unused.
    assert md.embedding_bytes() >= 0.85 * budget * full


def test_bigger_budget_never_gives_smaller_dims():
    tables = _many_tables()
    small = MixedDimEmbeddingBagCollection(tables, budget=0.3).dims()
    big = MixedDimEmbeddingBagCollection(tables, budget=0.6).dims()
    assert all(big[t] >= small[t] for t in small)


def test_full_budget_keeps_full_dims_without_projections():
    tables = _many_tables(4)
    md = MixedDimEmbeddingBagCollection(tables, budget=1.0)
    assert set(md.dims().values()) == {D}
    assert len(md.projections) == 0
    assert md.embedding_bytes() == _full_bytes(tables)


def test_too_small_budget_says_md_cannot_reach_it():
    tables = _many_tables(4)
    with pytest.raises(ValueError, match=r"budget=0\.05 .*cannot reach"):
        MixedDimEmbeddingBagCollection(tables, budget=0.05)


def test_bad_inputs_name_the_value():
    tables = _many_tables(3)
    with pytest.raises(ValueError, match="2 popularities vs 3 tables"):
        MixedDimEmbeddingBagCollection(tables, budget=0.5, popularity=[0.1, 0.2])
    with pytest.raises(ValueError, match="multiple of 4"):
        MixedDimEmbeddingBagCollection(_many_tables(2, dim=6), budget=0.5)
    with pytest.raises(ValueError, match="budget must be .* got -1"):
        MixedDimEmbeddingBagCollection(tables, budget=-1)


def test_feature_popularity_by_hand():
    ids = np.array([[0, 5], [0, 6], [1, 7], [2, 8]], dtype=np.int64)
    # f0 rows counted 2,1,1 of 4: 0.5^2 + 0.25^2 + 0.25^2; f1 uniform over 4 rows: 1/4.
    assert feature_popularity(ids) == pytest.approx([0.375, 0.25])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        feature_popularity(ids[:, 0])


def test_skewed_feature_gets_larger_dim():
    rng = np.random.default_rng(0)
    skewed = rng.zipf(1.5, size=5000) % 1000
    uniform = rng.integers(0, 1000, size=5000)
    pop = feature_popularity(np.stack([skewed, uniform], axis=1))
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=1000,
                                 feature_names=[f"f{i}"]) for i in range(2)]
    dims = MixedDimEmbeddingBagCollection(tables, budget=0.4, popularity=pop).dims()
    assert dims["t0"] > dims["t1"]


def _mixed_pooling_tables():
    tables = make_tables()  # t0 feeds f0 and f1; dims 8, 16, 8
    tables[1].pooling = PoolingType.MEAN  # t1 in its own FusedEBC group, between t0 and t2
    return tables


def test_output_matches_ebc_contract_and_hand_projection(gen):
    tables = _mixed_pooling_tables()
    md = MixedDimEmbeddingBagCollection(tables, budget=0.6, temperature=0.0)
    ebc = EmbeddingBagCollection(tables)
    kjt = random_kjt(tables, 5, gen)
    out, ref = md(kjt), ebc(kjt)
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    assert out.values().shape == ref.values().shape
    weights = {n.split(".")[-2]: p for n, p in md._ebc.named_parameters()}
    got = out.to_dict()
    for t in tables:
        for f in t.feature_names:
            jt = kjt[f]
            rows = [weights[t.name][ids].sum(0) if len(ids) else torch.zeros(md.dims()[t.name])
                    for ids in torch.split(jt.values(), jt.lengths().tolist())]
            pooled = torch.stack(rows)
            if t.pooling == PoolingType.MEAN:
                pooled = pooled / jt.lengths().clamp(min=1)[:, None]
            expected = md.projections[t.name](pooled) if t.name in md.projections else pooled
            torch.testing.assert_close(got[f], expected, msg=f"feature {f} of table {t.name}")


def _ctr_batch(tables, gen, batch_size=32, num_dense=4):
    kjt = random_kjt(tables, batch_size, gen, max_len=1)
    dense = torch.randn(batch_size, num_dense, generator=gen)
    labels = (torch.rand(batch_size, generator=gen) > 0.5).float()
    return dense, kjt, labels


def test_training_updates_tables_and_projections(gen):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([30, 300, 3000])]
    md = MixedDimEmbeddingBagCollection(tables, budget=0.4, lr=0.1)
    assert md.projections, "budget 0.4 must shrink some table"
    model = build_dlrm(md, 4, [8, 16], [8, 1])
    dense_params = dense_parameters(model)
    dense_ids = {id(p) for p in dense_params}
    assert all(id(p) in dense_ids for p in md.projections.parameters())
    assert not any(id(p) in dense_ids for p in md._ebc.parameters())
    assert any(isinstance(m, FusedEmbeddingBagCollection) for m in model.modules())
    opt = torch.optim.Adam(dense_params, lr=0.01)
    batches = [_ctr_batch(tables, gen) for _ in range(4)]
    before_tables = [p.detach().clone() for p in md._ebc.parameters()]
    before_proj = [p.detach().clone() for p in md.projections.parameters()]
    before_out = md(batches[0][1]).values().detach().clone()
    for dense, kjt, labels in batches:
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before_tables, md._ebc.parameters()))
    assert all(not torch.equal(b, p) for b, p in zip(before_proj, md.projections.parameters()))
    assert not torch.allclose(before_out, md(batches[0][1]).values())
    assert md.fused_optimizer.state_dict()["state"]  # row-wise Adagrad state is exposed
