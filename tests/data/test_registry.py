"""Tests of the load_dataset entry point."""

from pathlib import Path

import pytest
import torch

from torchrec_fiited.data.registry import SUPPORTED_DATASETS, load_dataset

SYNTH = dict(num_train=1000, num_test=300, cardinality_scale=0.01)


def test_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; supported datasets: "
                                         "synthetic, synthetic_easy, criteo, avazu, movielens"):
        load_dataset("imagenet")
    assert SUPPORTED_DATASETS == ("synthetic", "synthetic_easy", "criteo", "avazu", "movielens")


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) nm_train for dataset 'synthetic'; "
                                         r"accepted: seed, num_train"):
        load_dataset("synthetic", nm_train=5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) seed for dataset 'criteo'.*path, "
                                         r"test_path"):
        load_dataset("criteo", path="x", seed=1)


def test_synthetic_batches() -> None:
    train, test, spec = load_dataset("synthetic", batch_size=256, test_batch_size=100, **SYNTH)
    assert [b.labels.shape[0] for b in train] == [256, 256, 256, 232]
    assert [b.labels.shape[0] for b in test] == [100, 100, 100]
    batch = train[0]
    assert batch.dense_features.shape == (256, spec.num_dense)
    assert batch.sparse_features.keys() == list(spec.sparse_names)
    for f, key in enumerate(spec.sparse_names):
        assert int(batch.sparse_features[key].values().max()) < spec.num_embeddings[f]
    dropped, _, _ = load_dataset("synthetic", batch_size=256, drop_last=True, **SYNTH)
    assert len(dropped) == 3


def test_shuffle_permutes_train_only() -> None:
    plain, plain_test, _ = load_dataset("synthetic", batch_size=1300, **SYNTH)
    mixed, mixed_test, _ = load_dataset("synthetic", batch_size=1300, shuffle=True,
                                        shuffle_seed=1, **SYNTH)
    a, b = plain[0].dense_features, mixed[0].dense_features
    assert not torch.equal(a, b)
    assert torch.allclose(a.sum(0), b.sum(0))  # same rows, other order
    assert torch.equal(torch.sort(plain[0].labels).values, torch.sort(mixed[0].labels).values)
    assert torch.equal(plain_test[0].dense_features, mixed_test[0].dense_features)


def test_file_dataset_through_registry(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{m}::{(u + m) % 5 + 1}::{1000 + i}\n"
                            for i, (u, m) in enumerate((u, m) for u in range(5) for m in range(4))))
    train, test, spec = load_dataset("movielens", path=str(path), batch_size=8, progress=False)
    assert spec.name == "movielens" and sum(b.labels.numel() for b in train) == 18
    assert sum(b.labels.numel() for b in test) == 2
