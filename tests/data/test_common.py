"""Tests of the shared data helpers: hash sizes, id assignment, batching, splitting."""

import zlib

import numpy as np
import pytest
import torch

from torchrec_fiited.data.common import (
    MISSING_HASH,
    MISSING_ID,
    CTRArrays,
    DatasetSpec,
    MalformedLines,
    hash_sizes_from_cardinalities,
    hash_token,
    ids_from_hashes,
    log_transform_dense,
    make_batches,
    resolve_hash_sizes,
    split_tail,
)


def _arrays(n: int, n_dense: int = 2, n_sparse: int = 3) -> CTRArrays:
    """n examples whose values encode their row index, to check order and layout."""
    rows = np.arange(n)
    return CTRArrays(
        dense=np.stack([rows * 10.0 + j for j in range(n_dense)], axis=1).astype(np.float32),
        sparse=np.stack([rows * 100 + f for f in range(n_sparse)], axis=1).astype(np.int64),
        labels=(rows % 2).astype(np.float32),
    )


def test_hash_sizes_from_cardinalities_adds_missing_slot_and_caps() -> None:
    assert hash_sizes_from_cardinalities([0, 5, 100], cap=50) == (1, 6, 50)


def test_hash_sizes_from_cardinalities_rejects_bad_cap() -> None:
    with pytest.raises(ValueError, match="cap must be >= 1, got 0"):
        hash_sizes_from_cardinalities([3], cap=0)


def test_hash_token_is_crc32_of_utf8() -> None:
    # Fixed value: ids must not change between processes (Python's hash() would).
    assert hash_token("68fd1e64") == 2704318627
    assert hash_token("é") == zlib.crc32("é".encode("utf-8"))


def test_ids_exact_vocabulary_when_it_fits() -> None:
    hashes = np.array([[7], [MISSING_HASH], [3], [7], [11]], dtype=np.int64)
    ids = ids_from_hashes(hashes, [4])  # 3 distinct values + missing fit exactly
    assert ids[:, 0].tolist() == [2, MISSING_ID, 1, 2, 3]


def test_ids_modulo_when_table_is_too_small() -> None:
    hashes = np.array([[7], [MISSING_HASH], [3], [10], [11]], dtype=np.int64)
    ids = ids_from_hashes(hashes, [3])  # 4 distinct values, 2 present slots
    assert ids[:, 0].tolist() == [1 + 7 % 2, MISSING_ID, 1 + 3 % 2, 1 + 10 % 2, 1 + 11 % 2]


def test_resolve_hash_sizes_int_is_cap_list_is_exact() -> None:
    hashes = np.array([[1, 5], [2, 5], [3, MISSING_HASH]], dtype=np.int64)
    assert resolve_hash_sizes(None, hashes, ["a", "b"]) == (4, 2)
    assert resolve_hash_sizes(3, hashes, ["a", "b"]) == (3, 2)
    assert resolve_hash_sizes([10, 20], hashes, ["a", "b"]) == (10, 20)
    with pytest.raises(ValueError, match="hash_sizes has 1 entries but there are 2"):
        resolve_hash_sizes([10], hashes, ["a", "b"])
    with pytest.raises(ValueError, match="feature 'b' is 0"):
        resolve_hash_sizes([10, 0], hashes, ["a", "b"])


def test_log_transform_dense_missing_and_negative_to_zero() -> None:
    raw = np.array([[np.nan, -5.0, 0.0, 3.0]])
    out = log_transform_dense(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.0, np.log(4.0)]], rtol=1e-6)


def test_make_batches_layout_and_drop_last() -> None:
    arrays = _arrays(10)
    batches = make_batches(arrays, 4, ["a", "b", "c"])
    assert [b.labels.shape[0] for b in batches] == [4, 4, 2]
    b = batches[1]
    assert b.dense_features.dtype == torch.float32 and b.dense_features.shape == (4, 2)
    assert b.dense_features[:, 0].tolist() == [40.0, 50.0, 60.0, 70.0]
    kjt = b.sparse_features
    assert kjt.keys() == ["a", "b", "c"] and kjt.stride() == 4
    assert kjt["b"].values().tolist() == [401, 501, 601, 701]
    assert kjt.values().dtype == torch.int64
    assert kjt.lengths().tolist() == [1] * 12
    assert len(make_batches(arrays, 4, ["a", "b", "c"], drop_last=True)) == 2


def test_make_batches_rejects_wrong_names_and_size() -> None:
    with pytest.raises(ValueError, match="2 sparse names but the arrays have 3"):
        make_batches(_arrays(4), 2, ["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make_batches(_arrays(4), 0, ["a", "b", "c"])


def test_split_tail_holds_out_last_rows() -> None:
    train, test = split_tail(_arrays(10), 0.3)
    assert train.sparse[:, 0].tolist() == [0, 100, 200, 300, 400, 500, 600]
    assert test.sparse[:, 0].tolist() == [700, 800, 900]
    with pytest.raises(ValueError, match="gives 0 test rows"):
        split_tail(_arrays(3), 0.1)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        split_tail(_arrays(3), 1.5)


def test_dataset_spec_validates_lengths() -> None:
    with pytest.raises(ValueError, match="2 sparse names but 1 num_embeddings"):
        DatasetSpec(name="x", dense_names=("d",), sparse_names=("a", "b"), num_embeddings=(3,))
    with pytest.raises(ValueError, match="feature 'a' has num_embeddings 0"):
        DatasetSpec(name="x", dense_names=("d",), sparse_names=("a",), num_embeddings=(0,))


def test_malformed_lines_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="on_malformed must be 'skip' or 'fail', got 'ignore'"):
        MalformedLines("f.txt", "ignore")
