"""Tests of the synthetic generator: determinism, shapes, and that the planted signal is real."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from torchrec_fiited.data.common import CTRArrays
from torchrec_fiited.data.synthetic import PlantedModel, SyntheticConfig, make_synthetic

SMALL = SyntheticConfig(seed=3, num_train=100_000, num_test=50_000, cardinality_scale=0.05)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(scores.astype(np.float32)),
                              torch.from_numpy(labels).long()))


def _target_encoding(train: CTRArrays, f: int, size: int, prior: float = 20.0) -> np.ndarray:
    """Smoothed per-id CTR of feature f learned on train, float64 [size]."""
    ctr = train.labels.mean()
    clicks = np.bincount(train.sparse[:, f], weights=train.labels, minlength=size)
    counts = np.bincount(train.sparse[:, f], minlength=size)
    return (clicks + prior * ctr) / (counts + prior)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(SMALL), PlantedModel(SMALL)


def test_deterministic_from_seed() -> None:
    cfg = dataclasses.replace(SMALL, num_train=2000, num_test=500)
    a_train, a_test, a_spec = make_synthetic(cfg)
    b_train, b_test, b_spec = make_synthetic(cfg)
    assert a_spec == b_spec
    for a, b in ((a_train, b_train), (a_test, b_test)):
        for field in ("dense", "sparse", "labels", "logits"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c_train, _, _ = make_synthetic(dataclasses.replace(cfg, seed=4))
    assert not np.array_equal(a_train.sparse, c_train.sparse)


def test_shapes_dtypes_and_id_ranges(small) -> None:
    (train, test, spec), _ = small
    assert spec.name == "synthetic" and spec.num_dense == 13 and spec.num_sparse == 26
    assert spec.num_train_examples == len(train) == 100_000 and len(test) == 50_000
    assert train.dense.dtype == np.float32 and train.dense.shape == (100_000, 13)
    assert train.sparse.dtype == np.int64 and train.labels.dtype == np.float32
    assert set(np.unique(train.labels).tolist()) == {0.0, 1.0}
    for f, size in enumerate(spec.num_embeddings):
        assert train.sparse[:, f].min() >= 0 and train.sparse[:, f].max() < size
    assert max(spec.num_embeddings) == 5000 and min(spec.num_embeddings) == 2


def test_base_ctr_and_true_model_auc(small) -> None:
    (train, test, _), _ = small
    assert abs(train.labels.mean() - 0.25) < 0.01
    assert 0.75 <= _auc(test.logits, test.labels) <= 0.83
    rare = make_synthetic(dataclasses.replace(SMALL, base_ctr=0.05, num_train=50_000))[0]
    assert abs(rare.labels.mean() - 0.05) < 0.01


def test_signal_free_features_are_uninformative(small) -> None:
    (train, test, spec), model = small
    noise_aucs, signal_aucs = [], []
    for f, truth in enumerate(model.features):
        enc = _target_encoding(train, f, spec.num_embeddings[f])
        auc = _auc(enc[test.sparse[:, f]], test.labels)
        (signal_aucs if truth.informative else noise_aucs).append(auc)
    assert len(signal_aucs) == 12 and len(noise_aucs) == 14
    assert max(abs(a - 0.5) for a in noise_aucs) < 0.015
    assert max(signal_aucs) > 0.56


def test_a_model_learned_on_train_beats_chance(small) -> None:
    (train, test, spec), _ = small
    ctr = train.labels.mean()
    score = np.zeros(len(test))
    for f in range(spec.num_sparse):  # naive Bayes on target encodings: additive part only
        enc = _target_encoding(train, f, spec.num_embeddings[f])
        score += np.log(enc / (1 - enc))[test.sparse[:, f]] - np.log(ctr / (1 - ctr))
    learned = _auc(score, test.labels)
    assert 0.62 < learned < _auc(test.logits, test.labels)


def test_dense_signal_only_in_weighted_features(small) -> None:
    (_, test, _), model = small
    weights = model.dense_weights
    assert np.count_nonzero(weights) == 5
    strongest = int(np.argmax(np.abs(weights)))
    auc = _auc(np.sign(weights[strongest]) * test.dense[:, strongest], test.labels)
    assert auc > 0.53
    for j in np.flatnonzero(weights == 0):
        assert abs(_auc(test.dense[:, j], test.labels) - 0.5) < 0.015


def test_latent_ranks_differ_across_features(small) -> None:
    _, model = small
    ranks = [t.rank for t in model.features if t.informative]
    assert sorted(set(ranks)) == [0, 1, 2, 4]
    for truth, tables in zip(model.features, model.tables):
        if not truth.informative:
            assert tables.additive is None and tables.latent is None
        elif truth.rank == 0:
            assert tables.latent is None
        else:
            assert tables.latent.shape == (2, truth.cardinality, 4)
            if truth.cardinality > truth.rank:
                assert np.linalg.matrix_rank(tables.latent[0]) == truth.rank


def test_popular_ids_carry_stronger_effects(small) -> None:
    _, model = small
    checked = 0
    for truth, tables in zip(model.features, model.tables):
        if truth.informative and truth.cardinality >= 1000:
            effect = np.abs(tables.additive[0][tables.perm])  # by popularity rank
            head = effect[: max(truth.head_size, 10)].mean()
            tail = effect[truth.cardinality // 2:].mean()
            assert head > 3 * tail
            checked += 1
    assert checked >= 1


def test_ids_follow_zipf(small) -> None:
    (train, _, spec), model = small
    f = int(np.argmax(spec.num_embeddings))
    size = spec.num_embeddings[f]
    expected = 1.0 / np.sum(np.arange(1, size + 1, dtype=np.float64) ** -SMALL.zipf_exponent)
    observed = np.mean(train.sparse[:, f] == model.tables[f].perm[0])
    assert abs(observed / expected - 1) < 0.05


def test_drift_rotates_per_id_effects() -> None:
    def corr_start_end(drift: float) -> float:
        cfg = dataclasses.replace(SMALL, drift=drift)
        model = PlantedModel(cfg)
        dense, ids = model.sample_inputs(20_000, np.random.default_rng(0))
        start = model.logits(dense, ids, np.zeros(20_000))
        end = model.logits(dense, ids, np.ones(20_000))
        return float(np.corrcoef(start, end)[0, 1])

    assert corr_start_end(0.0) == pytest.approx(1.0, abs=1e-12)
    assert corr_start_end(0.2) > 0.9
    assert corr_start_end(1.0) < 0.5  # only the dense part (20% of the variance) stays


def test_config_validation_and_hydra_structured_config() -> None:
    with pytest.raises(ValueError, match=r"SyntheticConfig.base_ctr = 1.2 is out of range"):
        SyntheticConfig(base_ctr=1.2)
    with pytest.raises(ValueError, match=r"SyntheticConfig.num_informative = 30"):
        SyntheticConfig(num_informative=30)
    # As Hydra does with a command-line override such as dataset.drift=0.5.
    conf = OmegaConf.merge(OmegaConf.structured(SyntheticConfig),
                           OmegaConf.from_dotlist(["drift=0.5", "seed=7"]))
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg, SyntheticConfig) and (cfg.drift, cfg.seed) == (0.5, 7)


def test_500k_examples_in_a_few_seconds() -> None:
    start = time.perf_counter()
    train, _, _ = make_synthetic(SyntheticConfig(num_train=500_000, num_test=10_000))
    assert len(train) == 500_000
    assert time.perf_counter() - start < 15.0
