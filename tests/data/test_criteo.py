"""Tests of the Criteo Kaggle / Terabyte reader on small files written to tmp_path."""

import gzip
import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from tests.data import reference
from tests.data.reference import spy_slow_path
from torchrec_fiited.data.common import MISSING_ID
from torchrec_fiited.data.common import log_transform_dense
from torchrec_fiited.data.criteo import CRITEO_SPARSE_NAMES, load_criteo, log1p_counts

# The first line of Criteo Kaggle train.txt: int_11 and cat_21 are missing.
KAGGLE_LINE = (
    "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b\tfb936136\t7b4723c4\t"
    "25c83c98\t7e0ccccf\tde7995b8\t1f89b562\ta73ee510\ta8cd5504\tb2cb9c98\t37c9c164\t"
    "2824a5f6\t1adce6ef\t8ba8b39a\t891b62e7\te5ba7672\tf54016b9\t21ddcdc9\tb1252a9d\t"
    "07b5194c\t\t3a171ecb\tc5c50484\te8b83407\t9727dd16"
)
KAGGLE_INTS = [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]


def _line(rng: random.Random, label: Optional[str] = None) -> str:
    """A random valid Criteo line with some missing values and hex categoricals."""
    label = label if label is not None else str(rng.randint(0, 1))
    ints = ["" if rng.random() < 0.2 else str(rng.randint(-3, 500)) for _ in range(13)]
    cats = ["" if rng.random() < 0.1 else f"{rng.randint(0, 10 ** (1 + f % 4)):08x}"
            for f in range(26)]
    return "\t".join([label] + ints + cats)


def _write(path: Path, lines: list[str], seed: int = 0, n_random: int = 0) -> Path:
    rng = random.Random(seed)
    body = lines + [_line(rng) for _ in range(n_random)]
    path.write_text("".join(line + "\n" for line in body))
    return path


def _load(path: Path, **kw):
    kw.setdefault("progress", False)
    return load_criteo(path, **kw)


def test_kaggle_line_is_parsed_exactly(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", [KAGGLE_LINE], n_random=49)
    train, test, spec = _load(path, test_fraction=0.2)
    assert (len(train), len(test)) == (40, 10)
    assert spec.sparse_names == CRITEO_SPARSE_NAMES and spec.num_dense == 13
    assert train.labels[0] == 0.0
    np.testing.assert_allclose(train.dense[0], np.log1p(KAGGLE_INTS).astype(np.float32), rtol=1e-6)
    assert train.sparse[0, 21] == MISSING_ID
    assert (np.delete(train.sparse[0], 21) != MISSING_ID).all()
    assert train.dense.dtype == np.float32 and train.sparse.dtype == np.int64


def test_ids_in_range_and_sizes_from_cardinalities(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", [], n_random=300)
    train, test, spec = _load(path)
    everything = np.concatenate([train.sparse, test.sparse])
    for f, size in enumerate(spec.num_embeddings):
        assert 0 <= everything[:, f].min() and everything[:, f].max() < size
        # No cap hit: one id per distinct value plus the missing slot, all used.
        assert np.unique(everything[everything[:, f] != 0, f]).size == size - 1
    assert spec.num_train_examples == len(train) == 270


def test_negative_and_missing_dense_become_zero(tmp_path: Path) -> None:
    rng = random.Random(1)
    fields = _line(rng, "1").split("\t")
    fields[1], fields[2], fields[3] = "-7", "", "3"
    path = _write(tmp_path / "train.txt", ["\t".join(fields)], n_random=9)
    train, _, _ = _load(path)
    np.testing.assert_allclose(train.dense[0, :3], [0.0, 0.0, math.log(4.0)], rtol=1e-6)


def test_int_cap_bounds_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", [], n_random=200)
    train, test, spec = _load(path, hash_sizes=5)
    assert max(spec.num_embeddings) == 5
    assert train.sparse.max() < 5 and test.sparse.max() < 5


def test_hash_size_list_must_have_26_entries(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", [], n_random=20)
    with pytest.raises(ValueError, match="hash_sizes has 3 entries but there are 26"):
        _load(path, hash_sizes=[10, 10, 10])
    _, _, spec = _load(path, hash_sizes=list(range(2, 28)))
    assert spec.num_embeddings == tuple(range(2, 28))


def test_separate_test_file_shares_ids(tmp_path: Path) -> None:
    rng = random.Random(5)
    shared = _line(rng, "1")
    train_path = _write(tmp_path / "day_0", [shared], seed=1, n_random=30)
    test_path = _write(tmp_path / "day_1", [shared], seed=2, n_random=20)
    train, test, spec = _load(train_path, test_path=test_path, test_fraction=0.5)
    assert (len(train), len(test)) == (31, 21)
    np.testing.assert_array_equal(train.sparse[0], test.sparse[0])
    assert spec.num_train_examples == 31


def test_max_rows_and_gzip(tmp_path: Path) -> None:
    rng = random.Random(3)
    lines = [_line(rng) for _ in range(50)]
    path = tmp_path / "day_0.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("".join(line + "\n" for line in lines))
    train, test, _ = _load(path, max_rows=20, test_fraction=0.25)
    assert (len(train), len(test)) == (15, 5)
    assert test.labels.tolist() == [float(l.split("\t")[0]) for l in lines[15:20]]


def _bad_lines() -> list[str]:
    rng = random.Random(7)
    good = [_line(rng) for _ in range(6)]
    too_short = "\t".join(good[0].split("\t")[:-2])
    bad_label = "2" + good[1][1:]
    fields = good[2].split("\t")
    fields[5] = "12.5"
    bad_dense = "\t".join(fields)
    # lines 1-2 good, 3 too short, 4 good, 5 bad label, 6 good, 7 bad dense, 8-9 good
    return [good[0], good[1], too_short, good[3], bad_label, good[4], bad_dense, good[5], good[2]]


def test_skip_mode_warns_with_line_numbers_and_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", _bad_lines())
    with pytest.warns(UserWarning, match=r"skipped 3 malformed line\(s\): line 3: expected 40 "
                                         r"tab-separated fields .* got 38; line 5: .*'2'.*; "
                                         r"line 7: dense feature int_4 .* '12.5'"):
        train, test, _ = _load(path, on_malformed="skip", test_fraction=0.5)
    assert len(train) + len(test) == 6


def test_fail_mode_raises_naming_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", _bad_lines())
    with pytest.raises(ValueError, match=r"train\.txt, line 3: malformed line: expected 40"):
        _load(path, on_malformed="fail")


def test_unlabelled_test_file_is_explained(tmp_path: Path) -> None:
    unlabelled = KAGGLE_LINE.split("\t", 1)[1]  # Kaggle test.txt: no label column
    path = _write(tmp_path / "test.txt", [unlabelled])
    with pytest.raises(ValueError, match=r"test\.txt, line 1: .*got 39 .*only labelled files"):
        _load(path, on_malformed="fail")
    with pytest.warns(UserWarning, match="only labelled files"):
        with pytest.raises(ValueError, match=r"test\.txt: no valid data rows \(1 malformed"):
            _load(path, on_malformed="skip")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.txt"):
        _load(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"data file is empty: .*empty\.txt"):
        _load(empty)
    good = _write(tmp_path / "train.txt", [], n_random=10)
    with pytest.raises(FileNotFoundError, match=r"missing_test\.txt"):
        _load(good, test_path=tmp_path / "missing_test.txt")


def test_bad_on_malformed_value(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", [], n_random=10)
    with pytest.raises(ValueError, match="on_malformed must be 'skip' or 'fail', got 'drop'"):
        _load(path, on_malformed="drop")


# ---- the vectorized reader against the line-by-line reference (tests/data/reference.py) ----


def _edge_case_file(path: Path, gz: bool = False) -> Path:
    """A Criteo file with every case the vectorized and the line-by-line readers must agree on."""
    rng = random.Random(11)
    good = [_line(rng) for _ in range(60)]

    def edit(line: str, **fields: str) -> str:
        parts = line.split("\t")
        for index, value in fields.items():
            parts[int(index[1:])] = value
        return "\t".join(parts)

    lines = [
        KAGGLE_LINE, *good[:20],
        edit(good[20], f1="-7", f2="", f3="+5", f4="99999999999999999999", f5=" 3", f6="-0"),
        edit(good[46], f1="123456", f2="65535", f3="65536", f13="9007199254740993"),  # > table
        "1" + "\t" * 39,                                             # everything missing
        edit(good[21], f14="é", f15="abc", f16="x\udcff", f17="0123456789abcdef0"),  # odd tokens
        "\t".join(good[22].split("\t")[:-2]),                        # 38 fields
        good[23].split("\t", 1)[1],                                  # 39 fields: unlabelled
        "2" + good[24][1:], "01" + good[25][1:], good[26][1:],       # labels 2, 01, empty
        edit(good[27], f5="12.5"), edit(good[28], f6="0x10"), edit(good[29], f7="1e3"),
        "", " ", *good[30:45], "", *good[45:],
    ]
    endings = ["\r\n" if i % 7 == 3 else "\r" if i == 40 else "\n" for i in range(len(lines))]
    text = "".join(line + end for line, end in zip(lines, endings))[:-1]  # no final newline
    data = text.encode("utf-8", "surrogateescape")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _malformed_warnings(fn, *args, **kwargs):
    """Calls fn and returns its result and the malformed-line warnings it gave."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught if "malformed" in str(w.message)]


@pytest.mark.filterwarnings("ignore:.*malformed")
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("block_size", [1, 97, 4096])
def test_vectorized_equals_line_reference_on_edge_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool, block_size: int
) -> None:
    path = _edge_case_file(tmp_path / ("day_0.gz" if gz else "train.txt"), gz)
    want, want_warn = _malformed_warnings(reference.load_criteo, path, test_fraction=0.25)
    assert len(want_warn) == 1 and "skipped 9 malformed line(s)" in want_warn[0]
    slow_rows = spy_slow_path(monkeypatch)
    for cache in (True, False):
        slow_rows.clear()
        got, got_warn = _malformed_warnings(_load, path, test_fraction=0.25, cache=cache,
                                            cache_dir=tmp_path / "cache", block_size=block_size)
        reference.assert_same(got, want)
        assert got_warn == want_warn
        # Some rows took the vectorized path: the test compares two readers, not one with itself.
        assert sum(slow_rows) < len(got[0]) + len(got[1])
    for hash_sizes in (5, None, list(range(1, 27))):
        got = _load(path, hash_sizes=hash_sizes, cache_dir=tmp_path / "cache",
                    block_size=block_size, on_malformed="skip")
        reference.assert_same(got, reference.load_criteo(path, hash_sizes=hash_sizes))


def test_fail_mode_names_the_same_line_as_the_reference(tmp_path: Path) -> None:
    path = _edge_case_file(tmp_path / "train.txt")
    with pytest.raises(ValueError) as want:
        reference.load_criteo(path, on_malformed="fail")
    for block_size in (1, 300, 1 << 20):
        with pytest.raises(ValueError) as got:
            _load(path, on_malformed="fail", block_size=block_size)
        assert str(got.value) == str(want.value)
    assert "train.txt, line 26: malformed line: expected 40" in str(want.value)


@pytest.mark.parametrize("max_rows", [3, 24, 25, 40])
def test_max_rows_reports_only_lines_before_the_last_row(tmp_path: Path, max_rows: int) -> None:
    path = _edge_case_file(tmp_path / "train.txt")
    want, want_warn = _malformed_warnings(reference.load_criteo, path, max_rows=max_rows,
                                          test_fraction=0.3)
    # 2000-byte blocks of about 8 lines: the last block is cut inside, its dictionaries shrunk.
    got, got_warn = _malformed_warnings(_load, path, max_rows=max_rows, test_fraction=0.3,
                                        block_size=2000)
    reference.assert_same(got, want)
    assert got_warn == want_warn


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_separate_test_file_equals_reference(tmp_path: Path) -> None:
    train = _edge_case_file(tmp_path / "day_0")
    test = _write(tmp_path / "day_1", [KAGGLE_LINE], seed=4, n_random=80)
    got = _load(train, test_path=test, max_rows=50, block_size=512)
    reference.assert_same(got, reference.load_criteo(train, test_path=test, max_rows=50))


def test_log1p_counts_equals_log_transform_dense() -> None:
    counts = np.array([-5, 0, 1, 2, 65535, 65536, 10**12, 2**62, -2**63], dtype=np.int64)
    want = log_transform_dense(counts.astype(np.float64)[:, None])[:, 0]
    np.testing.assert_array_equal(log1p_counts(counts), want)
