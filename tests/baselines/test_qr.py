"""Quotient-remainder embeddings: the remainder-size solver, the budget fit, the lookup."""

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
from torchrec_fiited.app.embeddings import embedding_bytes
from torchrec_fiited.baselines import BudgetUnreachable
from torchrec_fiited.baselines.qr import (
    QREmbeddingBagCollection, min_qr_rows, qr_rows, remainder_size, solve_remainders,
)

# The synthetic dataset's tables (Criteo Kaggle cardinalities x 0.1).
SYNTHETIC_E = [146, 58, 10000, 10000, 30, 2, 1252, 63, 2, 9314, 568, 10000, 319, 3, 1499,
               10000, 2, 565, 217, 2, 10000, 2, 2, 10000, 10, 10000]


def test_public_classes_have_docstrings():
    assert QREmbeddingBagCollection.__doc__ and solve_remainders.__doc__


@pytest.mark.parametrize("E", [5, 17, 100, 361, 997, 4096])
def test_remainder_size_is_the_best_fit_below_the_target(E):
    for target in range(1, E + 1, max(1, E // 97)):
        brute = [qr_rows(E, m) for m in range(2, E) if qr_rows(E, m) <= target]
        m = remainder_size(E, target)
        if not brute:
            assert m is None, (E, target)
        else:
            assert m is not None and qr_rows(E, m) == max(brute), (E, target, m)


@pytest.mark.parametrize("E", [5, 10, 99, 100, 101, 10_000, 9_999_991])
def test_min_rows_is_ceil_two_sqrt_e(E):
    assert min_qr_rows(E) == min(E, math.ceil(2 * math.sqrt(E)))


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_solver_fills_the_budget(budget):
    ms = solve_remainders(SYNTHETIC_E, [16] * len(SYNTHETIC_E), budget)
    rows = sum(e if m is None else qr_rows(e, m) for e, m in zip(SYNTHETIC_E, ms))
    assert rows <= budget * sum(SYNTHETIC_E)
    assert rows >= 0.99 * budget * sum(SYNTHETIC_E)
    # Tables QR cannot shrink (2 sqrt(E) >= E) stay whole.
    assert all((m is None) == (e <= 4) for e, m in zip(SYNTHETIC_E, ms))


def test_budget_below_two_sqrt_e_is_unreachable():
    with pytest.raises(BudgetUnreachable, match=r"budget=0\.01 is below what QR .* budget >= 0\.02"):
        solve_remainders(SYNTHETIC_E, [16] * len(SYNTHETIC_E), 0.01)
    # One table: 0.02 x 10000 = 200 rows = 2 sqrt(E) is reachable, a hair less is not.
    assert qr_rows(10_000, solve_remainders([10_000], [16], 0.02)[0]) == 200
    with pytest.raises(BudgetUnreachable):
        solve_remainders([10_000], [16], 0.0199)


def test_full_budget_keeps_tables_whole():
    assert solve_remainders([10, 1000], [8, 8], 1.0) == [None, None]


def test_bytes_are_both_tables_with_adagrad_state():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=n,
                                 feature_names=[f"f{i}"]) for i, n in enumerate([10_000, 1000, 3])]
    module = QREmbeddingBagCollection(tables, budget=0.1)
    ms = module.remainders()
    assert ms["t2"] is None
    rows = qr_rows(10_000, ms["t0"]) + qr_rows(1000, ms["t1"]) + 3
    assert embedding_bytes(module) == rows * 17 * 4
    assert rows <= 0.1 * 11_003 and rows >= 0.98 * 0.1 * 11_003


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_forward_is_pooled_quotient_times_pooled_remainder(pooling, gen):
    tables = make_tables(pooling, rows=400)  # t0 fed by f0 and f1
    module = QREmbeddingBagCollection(tables, budget=0.3)
    weights = module.stored_weights()
    with torch.no_grad():  # remainder rows start at ones; make them distinct
        for name, w in weights.items():
            w.copy_(torch.randn(w.shape, generator=gen))
    kjt = random_kjt(tables, 7, gen)
    got = module(kjt).to_dict()
    for t in tables:
        m = module.remainders()[t.name]
        assert m is not None
        for f in t.feature_names:
            jt = kjt[f]
            rows = []
            for ids in torch.split(jt.values(), jt.lengths().tolist()):
                q = weights[t.name + "__q"][ids // m].sum(0)
                r = weights[t.name + "__r"][ids % m].sum(0)
                if pooling == PoolingType.MEAN and len(ids):
                    q, r = q / len(ids), r / len(ids)
                rows.append(q * r)
            torch.testing.assert_close(got[f], torch.stack(rows), msg=f)


def test_one_id_bags_read_the_product_of_their_rows(gen):
    table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=1000, feature_names=["f"])
    module = QREmbeddingBagCollection([table], budget=0.1)
    w = module.stored_weights()
    with torch.no_grad():
        w["t__r"].copy_(torch.randn(w["t__r"].shape, generator=gen))
    m = module.remainders()["t"]
    ids = torch.tensor([0, 1, m, m + 1, 999])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.ones(5, dtype=torch.long))
    expected = w["t__q"][ids // m] * w["t__r"][ids % m]
    torch.testing.assert_close(module(kjt).values(), expected)
    assert len({tuple(r.tolist()) for r in expected}) == 5  # every id its own embedding


def test_unreachable_budget_raises_from_the_module():
    with pytest.raises(BudgetUnreachable):
        QREmbeddingBagCollection(make_tables(rows=10_000), budget=0.001)
