"""The hashing trick: the hash itself (reference, range, spread, salting) and the module's lookup."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import PoolingType

from tests.conftest import make_tables, random_kjt
from torchrec_fiited.baselines import HashedEmbeddingBagCollection, hash_ids, mix64
from torchrec_fiited.baselines.hashing import table_salt

MASK = (1 << 64) - 1


def _mix64_reference(z: int) -> int:
    """SplitMix64's finalizer in Python's unbounded ints."""
    z &= MASK
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_bit_for_bit():
    rng = np.random.default_rng(0)
    xs = [0, 1, 2, -1, -(1 << 63), (1 << 63) - 1] + rng.integers(-(1 << 63), (1 << 63) - 1, 200).tolist()
    got = mix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & MASK for g in got] == [_mix64_reference(x) for x in xs]


def test_hash_is_in_range_and_deterministic():
    ids = torch.arange(100_000)
    for rows in (1, 7, 1000, 99_999):
        h = hash_ids(ids, torch.tensor(table_salt("t")), torch.tensor(rows))
        assert int(h.min()) >= 0 and int(h.max()) < rows
        assert torch.equal(h, hash_ids(ids, torch.tensor(table_salt("t")), torch.tensor(rows)))
    assert table_salt("t_cat_3") == table_salt("t_cat_3") != table_salt("t_cat_4")


def _chi_square(buckets: torch.Tensor, rows: int) -> float:
    counts = torch.bincount(buckets, minlength=rows).double()
    expected = buckets.numel() / rows
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("stride", [1, 1000, 1024])
def test_hash_spreads_regular_ids_evenly(stride):
    # 100 ids per bucket; for a random map chi2 ~ chi2(999): mean 999, sd ~45. Ids that are
    # multiples of the bucket count all land in bucket 0 under plain `id % rows`.
    rows = 1000
    ids = torch.arange(100_000) * stride
    chi2 = _chi_square(hash_ids(ids, torch.tensor(table_salt("t0")), torch.tensor(rows)), rows)
    assert chi2 < 999 + 6 * 45, chi2


def test_two_tables_hash_differently():
    ids = torch.arange(20_000)
    rows = torch.tensor(1000)
    a = hash_ids(ids, torch.tensor(table_salt("t_a")), rows)
    b = hash_ids(ids, torch.tensor(table_salt("t_b")), rows)
    # Independent maps agree on ~1/1000 of the ids.
    assert float((a == b).double().mean()) < 0.005
    # And the pairs that collide in one table mostly do not in the other.
    pairs_a = (a[:2000, None] == a[None, :2000]).triu(1)
    pairs_b = (b[:2000, None] == b[None, :2000]).triu(1)
    assert int((pairs_a & pairs_b).sum()) < 0.01 * int(pairs_a.sum())


def _manual(module, kjt, ids_of):
    """Pool each feature by hand: F.embedding_bag over ``ids_of(table, ids)`` with the module's
    stored weights."""
    weights = module.stored_weights()
    out = {}
    for t in module.embedding_bag_configs():
        for f in t.feature_names:
            jt = kjt[f]
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)[:-1]])
            mode = "mean" if t.pooling == PoolingType.MEAN else "sum"
            out[f] = F.embedding_bag(ids_of(t, jt.values()), weights[t.name], offsets, mode=mode)
    return out


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_forward_is_embedding_bag_over_hashed_ids(pooling, gen):
    tables = make_tables(pooling, rows=400)  # t0 is fed by two features: one hash for both
    module = HashedEmbeddingBagCollection(tables, budget=0.3)
    assert module.hashed_rows() == {"t0": 120, "t1": 60, "t2": 120}
    kjt = random_kjt(tables, 7, gen)
    expected = _manual(module, kjt, lambda t, ids: hash_ids(
        ids, torch.tensor(table_salt(t.name)), torch.tensor(module.hashed_rows()[t.name])))
    got = module(kjt).to_dict()
    for f, e in expected.items():
        torch.testing.assert_close(got[f], e, msg=f)


def test_budget_one_keeps_every_row_unhashed(gen):
    tables = make_tables(rows=40)
    module = HashedEmbeddingBagCollection(tables, budget=1.0)
    assert module.hashed_rows() == {t.name: t.num_embeddings for t in tables}
    kjt = random_kjt(tables, 5, gen)
    expected = _manual(module, kjt, lambda t, ids: ids)
    got = module(kjt).to_dict()
    for f, e in expected.items():
        torch.testing.assert_close(got[f], e, msg=f)


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="budget must be .* got 0"):
        HashedEmbeddingBagCollection(make_tables(), budget=0.0)
