"""Tests of the MovieLens reader on small files written to tmp_path."""

import re
from pathlib import Path

import numpy as np
import pytest

from tests.data import reference
from tests.data.reference import spy_slow_path
from torchrec_fiited.data.movielens import load_movielens

# (user, movie, rating, timestamp), deliberately not in time order.
RATINGS = [
    (1, 10, 4.0, 1000), (1, 20, 3.5, 1005), (2, 10, 5.0, 1001), (2, 30, 1.0, 1009),
    (3, 20, 4.5, 1002), (3, 40, 3.0, 1008), (4, 10, 2.0, 1003), (4, 30, 4.0, 1007),
    (5, 40, 5.0, 1004), (5, 20, 0.5, 1006),
]


def _ratings_csv(path: Path, rows=RATINGS, extra: tuple[str, ...] = ()) -> Path:
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{m},{r},{t}" for u, m, r, t in rows]
    path.write_text("\n".join(lines + list(extra)) + "\n")
    return path


def _ratings_dat(path: Path, rows=RATINGS) -> Path:
    path.write_text("".join(f"{u}::{m}::{int(r)}::{t}\n" for u, m, r, t in rows))
    return path


def _load(path: Path, **kw):
    kw.setdefault("progress", False)
    return load_movielens(path, **kw)


def test_labels_time_order_and_split(tmp_path: Path) -> None:
    train, test, spec = _load(_ratings_csv(tmp_path / "ratings.csv"), test_fraction=0.3)
    by_time = sorted(RATINGS, key=lambda r: r[3])
    assert spec.sparse_names == ("user_id", "movie_id") and spec.dense_names == ("timestamp",)
    assert (len(train), len(test)) == (7, 3)
    expected = [float(r[2] >= 4.0) for r in by_time]  # 3.5 and 4.5 stars: 0 and 1
    assert train.labels.tolist() + test.labels.tolist() == expected
    # timestamps 1000..1006 in train scale to 0..1; test (1007..1009) goes beyond 1
    np.testing.assert_allclose(train.dense[:, 0], np.arange(7) / 6.0, rtol=1e-6)
    np.testing.assert_allclose(test.dense[:, 0], np.array([7, 8, 9]) / 6.0, rtol=1e-6)
    user_ids = np.concatenate([train.sparse[:, 0], test.sparse[:, 0]])
    users = [r[0] for r in by_time]
    for i in range(len(users)):  # same user <=> same id
        for j in range(len(users)):
            assert (user_ids[i] == user_ids[j]) == (users[i] == users[j])
    assert spec.num_embeddings == (6, 5)  # 5 users + missing, 4 movies + missing


def test_dat_files_with_movie_and_user_side_features(tmp_path: Path) -> None:
    ratings = _ratings_dat(tmp_path / "ratings.dat")
    movies = tmp_path / "movies.dat"
    movies.write_text("10::Toy Story (1995)::Animation|Children's|Comedy\n"
                      "20::Heat (1995)::Action|Crime|Thriller\n"
                      "30::Sabrina (1995)::Comedy|Romance\n")  # movie 40 has no entry
    users = tmp_path / "users.dat"
    users.write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
                     "4::M::45::7::02460\n5::M::25::20::55455\n")
    train, test, spec = _load(ratings, movies_path=movies, users_path=users, test_fraction=0.2)
    assert spec.sparse_names == ("user_id", "movie_id", "genres", "first_genre",
                                 "gender", "age", "occupation", "zip")
    rows = np.concatenate([train.sparse, test.sparse])
    movie_of_row = [r[1] for r in sorted(RATINGS, key=lambda r: r[3])]
    first_genre = rows[:, spec.sparse_names.index("first_genre")]
    # movies 10 and 30 both start with a different genre than 20; 40 is missing -> 0
    for row, movie in enumerate(movie_of_row):
        assert (first_genre[row] == 0) == (movie == 40)
    comedy_or_anim = {first_genre[movie_of_row.index(10)], first_genre[movie_of_row.index(30)]}
    assert len(comedy_or_anim) == 2 and first_genre[movie_of_row.index(20)] not in comedy_or_anim
    gender = rows[:, spec.sparse_names.index("gender")]
    assert spec.num_embeddings[spec.sparse_names.index("gender")] == 3
    assert len(set(gender.tolist())) == 2 and 0 not in gender
    for f, size in enumerate(spec.num_embeddings):
        assert rows[:, f].max() < size


def test_movies_csv_with_quoted_title(tmp_path: Path) -> None:
    movies = tmp_path / "movies.csv"
    movies.write_text('movieId,title,genres\n10,"American President, The (1995)",Comedy|Drama\n'
                      "20,Heat (1995),Action\n30,Nothing (2000),(no genres listed)\n")
    train, test, spec = _load(_ratings_csv(tmp_path / "ratings.csv"), movies_path=movies)
    rows = np.concatenate([train.sparse, test.sparse])
    genres = rows[:, spec.sparse_names.index("genres")]
    movie_of_row = [r[1] for r in sorted(RATINGS, key=lambda r: r[3])]
    for row, movie in enumerate(movie_of_row):  # "(no genres listed)" and absent 40 -> missing
        assert (genres[row] == 0) == (movie in (30, 40))


def test_skip_and_fail_modes(tmp_path: Path) -> None:
    extra = ("6,10,five,1010", "6,10,4.0", "6,10,4.0,noon", "6,10,9.0,1011", "7,20,4.0,1012")
    path = _ratings_csv(tmp_path / "ratings.csv", extra=extra)
    with pytest.warns(UserWarning, match=r"skipped 4 malformed line\(s\): line 12: rating 'five' "
                                         r"is not a number; line 13: expected 4 .*got 3; "
                                         r"line 14: timestamp 'noon'.*; line 15: rating '9.0' "
                                         r"is outside"):
        train, test, _ = _load(path)
    assert len(train) + len(test) == 11
    with pytest.raises(ValueError, match=r"ratings\.csv, line 12: malformed line: rating 'five'"):
        _load(path, on_malformed="fail")


def test_bad_header_and_suffix(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("user,movie,rating,time\n1,2,3.0,4\n")
    with pytest.raises(ValueError, match=r"ratings\.csv, line 1: header .* differs"):
        _load(path)
    other = tmp_path / "ratings.txt"
    other.write_text("1::2::3::4\n")
    with pytest.raises(ValueError, match=r"ratings\.txt: unknown MovieLens file type"):
        _load(other)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ratings\.dat"):
        _load(tmp_path / "ratings.dat")
    ratings = _ratings_dat(tmp_path / "ratings.dat")
    with pytest.raises(FileNotFoundError, match=r"users\.dat"):
        _load(ratings, users_path=tmp_path / "users.dat")
    (tmp_path / "movies.dat").write_text("")
    with pytest.raises(ValueError, match=r"data file is empty: .*movies\.dat"):
        _load(ratings, movies_path=tmp_path / "movies.dat")


def test_separate_test_file(tmp_path: Path) -> None:
    train_path = _ratings_csv(tmp_path / "train.csv", rows=RATINGS[:6])
    test_path = _ratings_csv(tmp_path / "test.csv", rows=RATINGS[6:])
    train, test, _ = _load(train_path, test_path=test_path)
    assert (len(train), len(test)) == (6, 4)
    # scaled by the train time range 1000..1009 (train holds 1009)
    assert train.dense.min() == 0.0 and train.dense.max() == 1.0


# ---- the vectorized reader against the line-by-line reference (tests/data/reference.py) ----

ODD_CSV = ("6,10,five,1010", "6,10,4.0", "6,10,4.0,noon", "6,10,9.0,1011", "6,10,nan,1012",
           ",10,4.0,1013", "6,,4.0,1014", "6,10,4.0,0x10", "6,10, 4.5 ,1015", "6,10,4.5,+1016",
           "6,10,4_5,1017", "6,10,1e0,1018", "u7,40,3.5,1004", "", "7,20,4.0,1012")
ODD_DAT = ("6::10::4::1020", "6::10::4", "6:::10::4::1021", "6::10::4::1022::", "6::x:10::4::1023",
           "7::20::5::1001", "7::20::4.5::1001", "::20::4::1024")


def _ml_files(tmp_path: Path, kind: str) -> dict:
    rows = RATINGS * 3 + [(9, 10 * (i % 5), (i % 10) / 2, 900 + i % 7) for i in range(40)]
    if kind == "csv":
        ratings = _ratings_csv(tmp_path / "ratings.csv", rows=rows, extra=ODD_CSV)
        movies = tmp_path / "movies.csv"
        movies.write_text('movieId,title,genres\n10,"American President, The (1995)",Comedy|Drama\n'
                          '20,"Say ""Hi"" (1990)",Action\r\n30,Nothing (2000),(no genres listed)\n'
                          ",No id,Drama\n40,Short\n")
        users = tmp_path / "users.csv"
        users.write_text("userId,gender,age,occupation,zip\n1,F,1,10,48067\n2,M,56,16,70072\n"
                         "9,M,25,15,55117\n6,F,18,3\n")
    else:
        ratings = tmp_path / "ratings.dat"
        ratings.write_text("".join(f"{u}::{m}::{int(r)}::{t}\n" for u, m, r, t in rows)
                           + "\n".join(ODD_DAT) + "\n")
        movies = tmp_path / "movies.dat"
        movies.write_text("10::Toy Story (1995)::Animation|Children's\n"
                          "20::Heat: The Movie::Action\n"
                          "30::Sabrina (1995)::Comedy|Romance\n")
        users = tmp_path / "users.dat"
        users.write_text("1::F::1::10::48067\n2::M::56::16::70072\n9::M::25::15::55117\n7::M::1\n")
    return dict(path=ratings, movies_path=movies, users_path=users)


@pytest.mark.filterwarnings("ignore:.*malformed")
@pytest.mark.parametrize("kind", ["csv", "dat"])
@pytest.mark.parametrize("block_size", [1, 64, 4096])
def test_vectorized_equals_line_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          kind: str, block_size: int) -> None:
    files = _ml_files(tmp_path, kind)
    want = reference.load_movielens(**files, test_fraction=0.2)
    slow_rows = spy_slow_path(monkeypatch)
    for cache in (True, False):
        slow_rows.clear()
        got = _load(**files, test_fraction=0.2, cache=cache, cache_dir=tmp_path / "c",
                    block_size=block_size)
        reference.assert_same(got, want)
        if block_size < 4096:  # (a 4096-byte block holds the whole file, bad lines included)
            assert sum(slow_rows) < len(got[0]) + len(got[1])  # some ratings took the fast path
    for options in (dict(max_rows=20, hash_sizes=3), dict(movies_path=None, users_path=None)):
        args = {**files, **options}
        reference.assert_same(_load(**args, block_size=block_size),
                              reference.load_movielens(**args))
    with pytest.raises(ValueError) as err:
        reference.load_movielens(**files, on_malformed="fail")
    with pytest.raises(ValueError, match=re.escape(str(err.value))):
        _load(**files, on_malformed="fail", block_size=block_size)


@pytest.mark.filterwarnings("ignore:.*malformed")
def test_separate_test_file_equals_reference(tmp_path: Path) -> None:
    train = _ratings_csv(tmp_path / "train.csv", rows=RATINGS[:6], extra=ODD_CSV[:3])
    test = _ratings_csv(tmp_path / "test.csv", rows=RATINGS[6:])
    got = _load(train, test_path=test, block_size=50)
    reference.assert_same(got, reference.load_movielens(train, test_path=test))
