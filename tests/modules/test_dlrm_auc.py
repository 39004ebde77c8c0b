"""AUC comparisons on the hard synthetic data, where embedding capacity decides the AUC.

Thresholds come from seed noise measured on this exact setup (data and model seeds 0, 1, 2; one
epoch): full 0.7982 / 0.7838 / 0.7844; against full,
the hashing trick at 10x fewer rows -0.092 / -0.085 / -0.102, FIITED at budget 0.25 (1.66x
measured) -0.002 / +0.006 / -0.009 (std 0.007), the hashing trick at FIITED's measured bytes
-0.036 / -0.053 / -0.053, so FIITED leads it by 0.034 / 0.059 / 0.045. Each threshold sits at
about half the measured effect and two or more seed stds from the mean, so the tests (which run
seed 0) do not flake, but a pruner that keeps the wrong chunks, or embeddings that learn nothing
per id, fail them.
"""

import functools

import torch

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.app.embeddings import embedding_bytes
from torchrec_fiited.app.loop import evaluate, train
from torchrec_fiited.app.model import build_dlrm, dense_parameters, full_embeddings, make_tables
from torchrec_fiited.baselines import (
    FreqOracleEmbeddingBagCollection, HashedEmbeddingBagCollection, feature_counts,
)
from torchrec_fiited.data.common import make_batches
from torchrec_fiited.data.registry import load_arrays

DIM, LR, BUDGET = 16, 0.05, 0.25


@functools.lru_cache(maxsize=None)
def _data():
    train_arrays, test_arrays, spec = load_arrays(
        "synthetic", seed=0, num_train=150_000, num_test=50_000, cardinality_scale=0.01)
    return (train_arrays, make_batches(train_arrays, 1024, spec.sparse_names),
            make_batches(test_arrays, 8192, spec.sparse_names), spec)


def _tables():
    spec = _data()[3]
    return make_tables(spec.sparse_names, spec.num_embeddings, DIM)


def _full_bytes() -> int:
    return sum(t.num_embeddings * (DIM + 1) * 4 for t in _tables())


def _fit(embeddings) -> float:
    _, train_batches, test_batches, spec = _data()
    torch.manual_seed(0)
    model = build_dlrm(embeddings, spec.num_dense, [64, DIM], [64, 32, 1])
    train(model, train_batches, torch.optim.Adam(dense_parameters(model), lr=1e-3), progress=False)
    return evaluate(model, test_batches)["auc"]


def _fiited_config(**extra) -> FiitedConfig:
    steps = len(_data()[1])
    return FiitedConfig(num_chunks=2, budget=BUDGET, learning_rate=LR, decay=0.98,
                        prune_interval=steps // 10, **extra)


@functools.lru_cache(maxsize=None)
def _full_auc() -> float:
    return _fit(full_embeddings(_tables(), LR, 1e-8))


@functools.lru_cache(maxsize=None)
def _fiited():
    emb = FiitedEmbeddingBagCollection(_tables(), _fiited_config())
    return _fit(emb), emb


def _hashed_auc(fraction: float) -> float:
    emb = HashedEmbeddingBagCollection(_tables(), fraction, LR, 1e-8)
    auc = _fit(emb)
    assert abs(embedding_bytes(emb) / _full_bytes() - fraction) < 0.01
    return auc


def test_capacity_matters_hashing_at_10x_loses():
    full = _full_auc()
    assert full > 0.77  # learnable at all
    assert _hashed_auc(0.1) <= full - 0.04


def test_frequency_oracle_at_10x_keeps_the_accuracy():
    counts = feature_counts(_data()[0].sparse, _data()[3].sparse_names)
    oracle = _fit(FreqOracleEmbeddingBagCollection(_tables(), 0.1, counts, LR, 1e-8))
    assert oracle >= _full_auc() - 0.01


def test_fiited_beats_hashing_at_equal_measured_bytes():
    fiited, emb = _fiited()
    fraction = embedding_bytes(emb) / _full_bytes()
    assert fiited >= _full_auc() - 0.015
    assert fiited >= _hashed_auc(fraction) + 0.02
    assert emb.stats()["pools"]["shared_cs8"]["last_cycle"]["enforced"]  # pruning really ran


def test_fiited_2d_prunes_dimensions_and_keeps_up_with_fiited():
    steps = len(_data()[1])
    dims = {"target_ratio": 0.375, "shared_columns": True, "cold_start_steps": steps // 5}
    emb = FiitedEmbeddingBagCollection(_tables(), _fiited_config(dim_pruning=dims))
    fiited_2d = _fit(emb)
    stats = emb.stats()
    assert {t["active_dim"] for t in stats["tables"].values()} == {10}  # 5 of 8 columns per chunk
    pool = emb.store.pools["shared_cs8"]
    assert stats["bytes"]["chunks"] == pool.capacity * 5 * 4
    assert fiited_2d >= _fiited()[0] - 0.01
