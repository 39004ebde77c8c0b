"""Tests of the Avazu reader on small CSV files written to tmp_path."""

import gzip
import random
import re
from pathlib import Path

import numpy as np
import pytest

from tests.data import reference
from tests.data.reference import spy_slow_path
from torchrec_fiited.data.avazu import load_avazu

HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
          "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
          "C14,C15,C16,C17,C18,C19,C20,C21")
# A real Avazu train.csv row (2014-10-21 was a Tuesday).
REAL_ROW = ("1000009418151094273,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,"
            "7801e8d9,07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79")


def _row(rng: random.Random, i: int, hour: str, click: str = "") -> str:
    fields = REAL_ROW.split(",")
    fields[0] = str(10**18 + i)
    fields[1] = click or str(rng.randint(0, 1))
    fields[2] = hour
    fields[5] = f"{rng.randint(0, 30):08x}"     # site_id
    fields[12] = f"{rng.randint(0, 200):08x}"   # device_ip
    fields[14] = "" if rng.random() < 0.2 else "1"  # device_type, sometimes missing
    return ",".join(fields)


def _write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def _rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    hours = ["14102100", "14102101", "14102200", "14102823"]  # Tue 0h, Tue 1h, Wed 0h, Tue 23h
    return [_row(rng, i, hours[i % 4]) for i in range(n)]


def _load(path: Path, **kw):
    kw.setdefault("progress", False)
    return load_avazu(path, **kw)


def test_features_labels_and_constant_dense(tmp_path: Path) -> None:
    rows = [REAL_ROW] + _rows(39)
    train, test, spec = _load(_write(tmp_path / "train.csv", rows), test_fraction=0.25)
    expected = tuple(c for c in HEADER.split(",") if c not in ("id", "click"))
    assert spec.sparse_names == expected + ("hour_of_day", "weekday")
    assert spec.dense_names == ("const",)
    assert (len(train), len(test)) == (30, 10)
    assert train.dense.shape == (30, 1) and not train.dense.any()
    assert train.labels.tolist() == [float(r.split(",")[1]) for r in rows[:30]]
    for f, size in enumerate(spec.num_embeddings):
        for part in (train, test):
            assert 0 <= part.sparse[:, f].min() and part.sparse[:, f].max() < size


def test_hour_of_day_and_weekday_are_derived(tmp_path: Path) -> None:
    train, test, spec = _load(_write(tmp_path / "train.csv", _rows(40)))
    ids = np.concatenate([train.sparse, test.sparse])
    hod = ids[:, spec.sparse_names.index("hour_of_day")]
    wday = ids[:, spec.sparse_names.index("weekday")]
    # rows cycle Tue 0h, Tue 1h, Wed 0h, Tue 23h (2014-10-28 is also a Tuesday)
    assert hod[0] == hod[2] and len({hod[0], hod[1], hod[3]}) == 3
    assert wday[0] == wday[1] == wday[3] != wday[2]
    assert spec.num_embeddings[spec.sparse_names.index("weekday")] == 3  # 2 days + missing


def test_missing_value_gets_id_zero(tmp_path: Path) -> None:
    rows = _rows(20)
    fields = rows[0].split(",")
    fields[14] = ""
    rows[0] = ",".join(fields)
    train, _, spec = _load(_write(tmp_path / "train.csv", rows))
    col = spec.sparse_names.index("device_type")
    assert train.sparse[0, col] == 0 and (train.sparse[train.sparse[:, col] != 0, col] >= 1).all()


def _with_bad_rows() -> list[str]:
    rows = _rows(8)
    rows[1] = rows[1] + ",extra"                      # line 3
    fields = rows[4].split(",")
    fields[1] = "yes"                                  # line 6: bad click
    rows[4] = ",".join(fields)
    fields = rows[6].split(",")
    fields[2] = "14133100"                             # line 8: month 13
    rows[6] = ",".join(fields)
    return rows


def test_skip_mode_warns_with_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", _with_bad_rows())
    with pytest.warns(UserWarning, match=r"skipped 3 malformed line\(s\): line 3: expected 24 "
                                         r".*got 25; line 6: .*'click' has value 'yes'.*; "
                                         r"line 8: column 'hour' has value '14133100'"):
        train, test, _ = _load(path, test_fraction=0.2)
    assert len(train) + len(test) == 5


def test_fail_mode_raises_naming_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", _with_bad_rows())
    with pytest.raises(ValueError, match=r"train\.csv, line 3: malformed line: expected 24"):
        _load(path, on_malformed="fail")


def test_unlabelled_file_is_rejected(tmp_path: Path) -> None:
    header = HEADER.replace("id,click,", "id,")
    rows = [",".join(r.split(",")[:1] + r.split(",")[2:]) for r in _rows(4)]
    with pytest.raises(ValueError, match=r"test\.csv, line 1: header has no 'click' column.*"
                                         r"only labelled files"):
        _load(_write(tmp_path / "test.csv", rows, header=header))


def test_test_file_with_other_columns_is_rejected(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.csv", _rows(10))
    header = HEADER.replace(",C21", "")
    rows = [r.rsplit(",", 1)[0] for r in _rows(5)]
    other = _write(tmp_path / "other.csv", rows, header=header)
    with pytest.raises(ValueError, match=r"other\.csv: sparse columns .* differ"):
        _load(train, test_path=other)
    same = _write(tmp_path / "test.csv", _rows(6, seed=1))
    tr, te, _ = _load(train, test_path=same)
    assert (len(tr), len(te)) == (10, 6)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        _load(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"data file is empty: .*empty\.csv"):
        _load(tmp_path / "empty.csv")
    header_only = _write(tmp_path / "header.csv", [])
    with pytest.raises(ValueError, match=r"header\.csv: no valid data rows"):
        _load(header_only)


# ---- the vectorized reader against the line-by-line reference (tests/data/reference.py) ----


def _edge_case_file(path: Path, gz: bool = False) -> Path:
    rows = _rows(70, seed=3)

    def edit(row: str, **fields: str) -> str:
        parts = row.split(",")
        for index, value in fields.items():
            parts[int(index[1:])] = value
        return ",".join(parts)

    lines = [REAL_ROW, *rows[:20],
             edit(rows[20], f3="", f5="", f12="é", f13="x\udcff"),       # missing, odd tokens
             rows[21] + ",extra", '"a,b"' + rows[22][rows[22].index(","):],  # 25 fields
             edit(rows[23], f1="yes"), edit(rows[24], f1="2"), edit(rows[25], f1=""),
             edit(rows[26], f2="14133100"), edit(rows[27], f2="1410210"),
             edit(rows[28], f2="abcdefgh"), "", *rows[29:]]
    endings = ["\r\n" if i % 5 == 1 else "\n" for i in range(len(lines))]
    text = HEADER + "\n" + "".join(line + end for line, end in zip(lines, endings))
    data = text.encode("utf-8", "surrogateescape")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.filterwarnings("ignore:.*malformed")
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("block_size", [1, 120, 4096])
def test_vectorized_equals_line_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          gz: bool, block_size: int) -> None:
    path = _edge_case_file(tmp_path / ("train.csv.gz" if gz else "train.csv"), gz)
    want = reference.load_avazu(path, test_fraction=0.2)
    slow_rows = spy_slow_path(monkeypatch)
    for cache in (True, False):
        slow_rows.clear()
        got = _load(path, test_fraction=0.2, cache=cache, cache_dir=tmp_path / "c",
                    block_size=block_size)
        reference.assert_same(got, want)
        assert got[2].sparse_names[-2:] == ("hour_of_day", "weekday")
        # Some rows took the vectorized path: the test compares two readers, not one with itself.
        assert sum(slow_rows) < len(got[0]) + len(got[1])
    with pytest.raises(ValueError) as err:
        reference.load_avazu(path, on_malformed="fail")
    with pytest.raises(ValueError, match=re.escape(str(err.value))):
        _load(path, on_malformed="fail", block_size=block_size)
    got = _load(path, max_rows=30, hash_sizes=4, block_size=block_size)
    reference.assert_same(got, reference.load_avazu(path, max_rows=30, hash_sizes=4))


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_separate_test_file_equals_reference(tmp_path: Path) -> None:
    train = _edge_case_file(tmp_path / "train.csv")
    test = _write(tmp_path / "test.csv", _rows(25, seed=9))
    got = _load(train, test_path=test, block_size=300)
    reference.assert_same(got, reference.load_avazu(train, test_path=test))
