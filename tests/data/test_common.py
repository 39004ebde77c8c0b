"""Tests of the shared data helpers: hash sizes, id assignment, batching, splitting."""

import zlib

import numpy as np
import pytest
import torch

from tests.data import reference
from torchrec_fiited.data.common import (
    MISSING_HASH,
    MISSING_ID,
    CTRArrays,
    DatasetSpec,
    MalformedLines,
    RawRows,
    SparseColumn,
    build_splits,
    check_hash_sizes,
    dictionary_ids,
    hash_size,
    hash_sizes_from_cardinalities,
    hash_token,
    log_transform_dense,
    make_batches,
    run_bounded,
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


def _ids(hashes: list[int], size: int) -> list[int]:
    ids, got = dictionary_ids([np.array(hashes, dtype=np.int64)], [size], 0)
    assert got == size
    return ids.tolist()


def test_ids_exact_vocabulary_when_it_fits() -> None:
    # 3 distinct values + missing fit exactly
    assert _ids([7, MISSING_HASH, 3, 7, 11], 4) == [2, MISSING_ID, 1, 2, 3]


def test_ids_modulo_when_table_is_too_small() -> None:
    # 4 distinct values, 2 present slots
    assert _ids([7, MISSING_HASH, 3, 10, 11], 3) == [1 + 7 % 2, MISSING_ID, 1 + 3 % 2,
                                                     1 + 10 % 2, 1 + 11 % 2]


def test_ids_single_slot_and_all_missing() -> None:
    assert _ids([7, 3, MISSING_HASH], 1) == [0, 0, 0]
    assert _ids([MISSING_HASH, MISSING_HASH], 5) == [0, 0]


def test_dictionary_ids_share_one_id_space_over_parts_with_repeated_entries() -> None:
    # Two parts whose dictionaries repeat values (one dictionary per block in a file).
    train = np.array([50, 2**32 - 1, 50], np.int64)
    test = np.array([MISSING_HASH, 7], np.int64)
    ids, size = dictionary_ids([train, test], None, 0)
    assert size == 4  # 50, 2**32 - 1, 7 and the missing slot
    assert ids.tolist() == [2, 3, 2, MISSING_ID, 1]


def test_build_splits_matches_the_np_unique_reference() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**32, size=(500, 3))
    hashes[:, 1] %= 7
    hashes[rng.random((500, 3)) < 0.1] = MISSING_HASH
    rows = RawRows(labels=np.zeros(500, np.float32), dense=np.zeros((500, 1), np.float32),
                   sparse=[SparseColumn.from_hashes(c) for c in hashes.T])
    for option in (None, 5, 100, [1, 400, 3]):
        train, test, sizes = build_splits(rows, None, 0.2, option, ["a", "b", "c"])
        want, want_sizes = reference.ids_from_hashes(hashes, option)
        assert sizes == want_sizes
        np.testing.assert_array_equal(np.concatenate([train.sparse, test.sparse]), want)


def test_sparse_column_head_drops_unused_entries() -> None:
    col = SparseColumn.from_hashes(np.array([9, 4, 9, 6, 4], np.int64))
    head = col.head(3)
    assert head.dictionary.tolist() == [4, 9] and head.hashes().tolist() == [9, 4, 9]


def test_hash_size_int_is_cap_list_is_exact() -> None:
    assert hash_size(None, 0, 3) == 4
    assert hash_size(3, 0, 3) == 3
    assert hash_size([10, 20], 1, 3) == 20
    check_hash_sizes([10, 20], ["a", "b"])
    with pytest.raises(ValueError, match="hash_sizes has 1 entries but there are 2"):
        check_hash_sizes([10], ["a", "b"])
    with pytest.raises(ValueError, match="feature 'b' is 0"):
        check_hash_sizes([10, 0], ["a", "b"])
    with pytest.raises(ValueError, match="cap must be >= 1, got 0"):
        check_hash_sizes(0, ["a", "b"])


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


def test_malformed_lines_replay_warns_or_fails_as_the_parse_did() -> None:
    parsed = MalformedLines("f.txt", "skip")
    for n in range(12):
        parsed.report(3 + n, f"bad {n}")
    replayed = MalformedLines("f.txt", "skip")
    replayed.replay(parsed.summary())
    assert replayed.summary() == parsed.summary()
    with pytest.warns(UserWarning, match=r"f\.txt: skipped 12 malformed line\(s\) \(first 10 "
                                         r"shown\): line 3: bad 0;"):
        replayed.finish()
    with pytest.raises(ValueError, match=r"f\.txt, line 3: malformed line: bad 0"):
        MalformedLines("f.txt", "fail").replay(parsed.summary())


def test_run_bounded_keeps_order_budget_and_errors() -> None:
    import threading
    import time

    lock, running, peak = threading.Lock(), [0], [0]
    costs = [40, 40, 100, 10, 10, 10]

    def task(i: int) -> int:
        with lock:
            running[0] += costs[i]
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= costs[i]
        return i * i

    assert run_bounded(task, costs, workers=3, budget=90) == [i * i for i in range(6)]
    assert peak[0] <= 100  # the 100-cost task runs alone; the others share 90
    assert run_bounded(task, costs, workers=1, budget=0) == [i * i for i in range(6)]

    def fail(i: int) -> int:
        raise ValueError(f"task {i}")

    with pytest.raises(ValueError, match="task 0"):
        run_bounded(fail, [1, 1], workers=2, budget=10)
