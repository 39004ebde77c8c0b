"""Frequency oracle: which rows it keeps, and that dropped ids read zeros and are never trained."""

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables
from torchrec_fiited.baselines import FreqOracleEmbeddingBagCollection, feature_counts, top_rows


def test_top_rows_are_the_top_k_by_count_ties_by_smaller_id():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 300)  # many ties
    for k in (1, 17, 150, 300):
        brute = sorted(range(300), key=lambda i: (-counts[i], i))[:k]
        assert top_rows(counts, k).tolist() == brute


def test_feature_counts_by_hand():
    ids = np.array([[0, 5], [0, 6], [2, 5]], dtype=np.int64)
    counts = feature_counts(ids, ["a", "b"])
    assert counts["a"].tolist() == [2, 0, 1]
    assert counts["b"].tolist() == [0, 0, 0, 0, 0, 2, 1]
    with pytest.raises(ValueError, match=r"\[N, 3\], got .* shape \(3, 2\)"):
        feature_counts(ids, ["a", "b", "c"])


def test_shared_table_ranks_by_summed_counts():
    tables = make_tables(rows=10)  # t0 fed by f0 and f1
    counts = {"f0": np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 9]), "f1": np.array([5, 0, 0, 6]),
              "f2": np.zeros(5, dtype=np.int64), "f3": np.arange(10)}
    module = FreqOracleEmbeddingBagCollection(tables, budget=0.3, counts=counts, scope="table")
    kept = module.kept_ids()
    assert kept["t0"].tolist() == [9, 3, 0]  # 9 (9), 3 (6), 0 (5)
    assert kept["t1"].tolist() == [0]        # 5 rows x 0.3 -> 1 row; all zero -> smallest id
    assert kept["t2"].tolist() == [9, 8, 7]


def test_collection_scope_ranks_every_table_together():
    tables = make_tables(rows=10)  # t0 (10 rows, f0 + f1), t1 (5 rows, f2), t2 (10 rows, f3)
    counts = {"f0": np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 9]), "f1": np.array([5, 0, 0, 6]),
              "f2": np.array([0, 50, 40, 30, 20]), "f3": np.arange(10)}
    # floor(0.3 * 25) = 7 pairs: t1's 50, 40, 30, 20, then 9 (t0 id 9, before t2 id 9 by table
    # order), 9 (t2 id 9), 8 (t2 id 8).
    kept = FreqOracleEmbeddingBagCollection(tables, budget=0.3, counts=counts).kept_ids()
    assert kept["t1"].tolist() == [1, 2, 3, 4]
    assert kept["t0"].tolist() == [9]
    assert kept["t2"].tolist() == [9, 8]
    # A table none of whose ids make the cut still keeps its most frequent one.
    counts["f3"] = np.zeros(10, dtype=np.int64)
    kept = FreqOracleEmbeddingBagCollection(tables, budget=0.2, counts=counts).kept_ids()
    assert kept["t2"].tolist() == [0] and kept["t1"].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="scope must be"):
        FreqOracleEmbeddingBagCollection(tables, budget=0.2, counts=counts, scope="rows")


def _one_table(pooling=PoolingType.SUM):
    table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"],
                               pooling=pooling)
    counts = {"f": np.array([9, 0, 8, 0, 7, 0, 0, 0, 0, 0])}  # keeps 0, 2, 4 at budget 0.3
    return FreqOracleEmbeddingBagCollection([table], budget=0.3, counts=counts, lr=0.5)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_dropped_ids_pool_to_zero_and_kept_ids_pool_alone(pooling):
    module = _one_table(pooling)
    assert module.kept_ids()["t"].tolist() == [0, 2, 4]
    w = module.stored_weights()["t"]  # rows: id 0, id 2, id 4
    #        0        1       2      <- batch
    # f   [1, 3]   [2, 5]   [0, 4]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 3, 2, 5, 0, 4]), lengths=torch.tensor([2, 2, 2]))
    out = module(kjt).values()
    assert torch.equal(out[0], torch.zeros(8))
    # A dropped id is absent, not a zero row: MEAN divides by the kept ids only.
    torch.testing.assert_close(out[1], w[1])
    both = w[0] + w[2]
    torch.testing.assert_close(out[2], both / 2 if pooling == PoolingType.MEAN else both)


def test_dropped_ids_are_never_updated():
    module = _one_table()
    before = module.stored_weights()["t"].detach().clone()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 3, 2, 5, 9]), lengths=torch.tensor([2, 2, 1]))
    out = module(kjt).values()
    out.sum().backward()
    after = module.stored_weights()["t"]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])  # not in batch
    assert not torch.equal(after[1], before[1])  # id 2 was trained
    # The batch without its dropped ids gives the same output and the same update.
    fresh = _one_table()
    fresh.load_state_dict({k: v for k, v in zip(module.state_dict(), [before])})
    kept_only = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([2]), lengths=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(fresh(kept_only).values(), out)
    fresh(kept_only).values().sum().backward()
    torch.testing.assert_close(fresh.stored_weights()["t"], after)


def test_counts_that_do_not_fit_the_table_are_rejected():
    table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4, feature_names=["f"])
    with pytest.raises(ValueError, match=r"feature 'f': training ids reach 5, outside \[0, 4\)"):
        FreqOracleEmbeddingBagCollection([table], 0.5, counts={"f": np.array([1, 0, 0, 0, 0, 1])})
    with pytest.raises(ValueError, match="no training counts for feature 'f'"):
        FreqOracleEmbeddingBagCollection([table], 0.5, counts={"g": np.ones(4)})
