"""Tests of the hard click-log generator: shape, determinism and the planted properties that make
embedding capacity matter (tail first-order signal, more dims for popular ids, noise features)."""

import dataclasses

import numpy as np
import pytest

from torchrec_fiited.data.clicklog import (
    ClickLogConfig, ClickLogModel, clicklog_cardinalities, latent_ranks, make_clicklog,
)
from torchrec_fiited.data.registry import load_arrays

SMALL = ClickLogConfig(seed=5, num_train=20_000, num_test=5_000, cardinality_scale=0.01)


def test_shapes_ranges_and_ctr() -> None:
    train, test, spec = make_clicklog(SMALL)
    assert (len(train), len(test)) == (20_000, 5_000)
    assert train.dense.shape == (20_000, 13) and train.sparse.shape == (20_000, 26)
    assert spec.num_embeddings == clicklog_cardinalities(SMALL)
    assert max(spec.num_embeddings) == 10_000 and min(spec.num_embeddings) == 4
    assert (train.sparse >= 0).all() and (train.sparse < np.array(spec.num_embeddings)).all()
    assert abs(train.labels.mean() - SMALL.base_ctr) < 0.02


def test_deterministic_per_seed_and_seed_changes_everything() -> None:
    a, _, _ = make_clicklog(SMALL)
    b, _, _ = make_clicklog(SMALL)
    assert np.array_equal(a.sparse, b.sparse) and np.array_equal(a.labels, b.labels)
    c, _, _ = make_clicklog(dataclasses.replace(SMALL, seed=6))
    assert not np.array_equal(a.sparse, c.sparse)


def test_full_scale_tables_span_tens_to_a_million() -> None:
    sizes = clicklog_cardinalities(ClickLogConfig())
    assert min(sizes) == 10 and max(sizes) == 1_000_000 and len(sizes) == 26


def test_latent_ranks_fall_with_popularity() -> None:
    ranks = latent_ranks(10_000, head=100.0, reach=10.0, latent_dim=8)
    assert (ranks[:100] == 8).all()          # the head has every dim
    assert (ranks[1000:] == 0).all()         # past reach * head: first order only
    assert (np.diff(ranks) <= 0).all() and 0 < ranks[500] < 8


def test_planted_signal_where_the_docstring_says() -> None:
    model = ClickLogModel(SMALL)
    noise = np.flatnonzero(~model.informative)
    assert len(noise) == SMALL.num_noise_features
    dense, ids = model.sample_inputs(2_000, np.random.default_rng(0))
    base = model.logits(dense, ids)
    # A noise feature's id changes nothing; an informative one's does.
    moved = ids.copy()
    moved[:, noise[0]] = (moved[:, noise[0]] + 1) % model.cardinalities[noise[0]]
    assert np.array_equal(model.logits(dense, moved), base)
    f = int(np.argmax(np.where(model.informative, model.cardinalities, 0)))
    feature = model.features[f]
    c = model.cardinalities[f]
    # Tail ids (past the latent reach) still carry a first-order effect, and no latent dims.
    tail = feature.perm[c // 2:]
    assert np.abs(feature.first_order[tail]).mean() > 0.1 * np.abs(feature.first_order).mean()
    assert not feature.latent[tail].any()
    # Popular ids span every latent dim; ids of mid popularity a subspace of fewer.
    head, mid = feature.perm[:20], feature.perm[int(0.05 * c):int(0.06 * c)]
    assert np.linalg.matrix_rank(feature.latent[head]) == SMALL.latent_dim
    assert 0 < np.linalg.matrix_rank(feature.latent[mid]) < SMALL.latent_dim // 2


def test_parts_take_their_variance_shares() -> None:
    model = ClickLogModel(SMALL)
    dense, ids = model.sample_inputs(20_000, np.random.default_rng(1))
    parts = model._scales[:, None] * model.logit_parts(dense, ids)
    shares = parts.var(axis=1) / SMALL.logit_std ** 2
    assert shares == pytest.approx([0.1, 0.3, 0.6], abs=0.05)


def test_registry_names_and_options() -> None:
    train, _, spec = load_arrays("synthetic", seed=5, num_train=1000, num_test=10,
                                 cardinality_scale=0.01, zipf_range=[1.1, 1.1])
    assert spec.name == "synthetic" and len(train) == 1000
    _, _, easy = load_arrays("synthetic_easy", num_train=100, num_test=10, cardinality_scale=0.01)
    assert easy.name == "synthetic_easy"


@pytest.mark.parametrize("field,value", [("cardinality_scale", 0.0), ("zipf_range", (1.2, 1.1)),
                                         ("num_noise_features", 26), ("base_ctr", 1.0)])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"ClickLogConfig.{field}"):
        ClickLogConfig(**{field: value})
