"""Reader for MovieLens ratings, turned into a CTR-style binary task.

Inputs (``.gz`` accepted for all):

* ratings, required: ``ratings.csv`` (MovieLens latest/20M/25M: header
  ``userId,movieId,rating,timestamp``) or ``ratings.dat`` (MovieLens 1M/10M:
  ``UserID::MovieID::Rating::Timestamp``, no header).
* movies, optional: ``movies.csv`` (``movieId,title,genres``, CSV quoting) or
  ``movies.dat`` (``MovieID::Title::Genres``). Adds the sparse features ``genres``
  (the whole ``|``-joined genre list as one value) and ``first_genre``;
  ``(no genres listed)`` counts as missing.
* users, optional: ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``,
  MovieLens 1M) or a ``.csv`` with a header line and those five columns. Adds
  ``gender``, ``age``, ``occupation``, ``zip``.

Label: ``rating >= 4`` (4 and 5 stars positive, as in the FIITED paper; half
stars below 4 are negative). Sparse features: ``user_id``, ``movie_id`` and the
side features above; a rating whose movie or user is absent from the side file
gets the missing id 0 for those features. Dense feature: ``timestamp``, scaled
to [0, 1] over the training split's time range (test values may exceed 1).

Rows are sorted by timestamp (stable). Without a test file, the last
``test_fraction`` of the rows in time order is the test split.
"""

import csv
import math
import os
import zlib
from collections.abc import Callable
from typing import Optional, Union

import numpy as np

from torchrec_fiited.data.common import (
    DEFAULT_MAX_HASH_SIZE,
    MISSING_HASH,
    CTRArrays,
    DatasetSpec,
    HashSizes,
    MalformedLineError,
    ParsedRow,
    RawRows,
    RowBuffer,
    build_splits,
    open_text,
    read_rows,
    tail_split_point,
)

RATING_NAMES = ("user_id", "movie_id")
MOVIE_NAMES = ("genres", "first_genre")
USER_NAMES = ("gender", "age", "occupation", "zip")
MOVIELENS_DENSE_NAMES = ("timestamp",)
POSITIVE_RATING = 4.0
RATINGS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
NO_GENRES = "(no genres listed)"
_NO_DENSE: tuple[float, ...] = ()


def _h(token: str) -> int:
    """Stable hash of a non-empty token, MISSING_HASH for an empty one."""
    return zlib.crc32(token.encode("utf-8", "surrogateescape")) if token else MISSING_HASH


def _layout(path: str) -> tuple[str, bool]:
    """Returns ``(separator, has_header)`` from the file suffix (``.gz`` ignored).

    Raises:
        ValueError: If the suffix is neither ``.csv`` nor ``.dat``.
    """
    stem = path[:-3] if path.endswith(".gz") else path
    if stem.endswith(".dat"):
        return "::", False
    if stem.endswith(".csv"):
        return ",", True
    raise ValueError(f"{path}: unknown MovieLens file type, expected a .csv or .dat file")


def _split(line: str, sep: str, n_fields: int) -> list[str]:
    """Splits a line into exactly ``n_fields`` fields (CSV quoting for ',').

    Raises:
        MalformedLineError: On a different field count.
    """
    parts = next(csv.reader([line])) if sep == "," else line.split(sep)
    if len(parts) != n_fields:
        raise MalformedLineError(f"expected {n_fields} {sep!r}-separated fields, got {len(parts)}")
    return parts


def _parse_rating(sep: str) -> Callable[[str], ParsedRow]:
    """Returns a parser of rating lines giving ``(label, (timestamp,), (user, movie) hashes)``."""

    def parse(line: str) -> ParsedRow:
        # Plain split: rating files have no quoting, and csv.reader is 5x slower.
        parts = line.split(sep)
        if len(parts) != 4:
            raise MalformedLineError(f"expected 4 {sep!r}-separated fields, got {len(parts)}")
        user, movie, rating, stamp = parts
        if not user or not movie:
            raise MalformedLineError(f"empty user id {user!r} or movie id {movie!r}")
        try:
            value = float(rating)
        except ValueError:
            raise MalformedLineError(f"rating {rating!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise MalformedLineError(f"rating {rating!r} is outside [0, 5]")
        try:
            seconds = float(int(stamp))
        except ValueError:
            raise MalformedLineError(f"timestamp {stamp!r} is not an integer") from None
        return float(value >= POSITIVE_RATING), (seconds,), (_h(user), _h(movie))

    return parse


def _parse_movie(sep: str) -> Callable[[str], ParsedRow]:
    """Returns a parser of movie lines giving hashes ``(movie, genres, first genre)``."""

    def parse(line: str) -> ParsedRow:
        parts = next(csv.reader([line])) if sep == "," else line.split(sep)
        if len(parts) < 3 or not parts[0]:
            raise MalformedLineError(f"expected movie id, title, genres; got {len(parts)} fields")
        genres = parts[-1]  # last field: a title may contain the separator
        if genres == NO_GENRES:
            genres = ""
        return 0.0, _NO_DENSE, (_h(parts[0]), _h(genres), _h(genres.split("|")[0]))

    return parse


def _parse_user(sep: str) -> Callable[[str], ParsedRow]:
    """Returns a parser of user lines giving hashes ``(user, gender, age, occupation, zip)``."""

    def parse(line: str) -> ParsedRow:
        parts = _split(line, sep, 1 + len(USER_NAMES))
        if not parts[0]:
            raise MalformedLineError("empty user id")
        return 0.0, _NO_DENSE, tuple(_h(p) for p in parts)

    return parse


def _read(
    path: Union[str, os.PathLike],
    make_parser: Callable[[str], Callable[[str], ParsedRow]],
    n_dense: int,
    n_sparse: int,
    max_rows: Optional[int],
    on_malformed: str,
    progress: bool,
    header: Optional[list[str]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads one MovieLens file with the parser for its layout.

    Args:
        path: The file (``.csv`` or ``.dat``, optionally ``.gz``).
        make_parser: Builds the line parser for a separator.
        n_dense: Raw dense values per row.
        n_sparse: Hashes per row.
        max_rows: Read at most this many valid rows.
        on_malformed: ``"skip"`` or ``"fail"``.
        progress: Show a tqdm progress bar.
        header: Exact expected CSV header, or None to skip the header unchecked.

    Returns:
        float32 labels ``[N]``, float64 raw dense ``[N, n_dense]``, int64 hashes ``[N, n_sparse]``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On an empty file, a wrong header, no valid row, or a bad line in fail mode.
    """
    path = os.fspath(path)
    sep, has_header = _layout(path)
    with open_text(path) as handle:
        start = 1
        if has_header:
            found = handle.readline().rstrip("\r\n").split(",")
            if header is not None and found != header:
                raise ValueError(
                    f"{path}, line 1: header {found} differs from the expected {header}"
                )
            start = 2
        buffer = read_rows(handle, path, make_parser(sep), RowBuffer(n_dense, n_sparse),
                           max_rows, on_malformed, progress, start_lineno=start)
    return buffer.arrays()


def _lookup(keys: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Joins side features onto rows by key hash.

    Args:
        keys: int64 ``[N]`` key hashes of the rows (user or movie).
        side: int64 ``[M, 1 + S]``: key hash, then S feature hashes; first row per key wins.

    Returns:
        int64 ``[N, S]`` feature hashes, MISSING_HASH where the key is absent from ``side``.
    """
    uniq, first = np.unique(side[:, 0], return_index=True)
    values = side[first, 1:]
    pos = np.minimum(np.searchsorted(uniq, keys), uniq.size - 1)
    found = uniq[pos] == keys
    return np.where(found[:, None], values[pos], MISSING_HASH)


def _with_side(hashes: np.ndarray, movies: Optional[np.ndarray],
               users: Optional[np.ndarray]) -> np.ndarray:
    """Appends movie and user side-feature hashes to int64 ``[N, 2]`` (user, movie) hashes."""
    cols = [hashes]
    if movies is not None:
        cols.append(_lookup(hashes[:, 1], movies))
    if users is not None:
        cols.append(_lookup(hashes[:, 0], users))
    return np.concatenate(cols, axis=1)


def _time_sorted(labels: np.ndarray, stamps: np.ndarray, hashes: np.ndarray):
    """Sorts rows by timestamp (stable) and returns ``(labels, stamps [N], hashes)``."""
    order = np.argsort(stamps[:, 0], kind="stable")
    return labels[order], stamps[order, 0], hashes[order]


def _scaled(stamps: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 ``[N, 1]`` timestamps scaled so that ``[lo, hi]`` maps to ``[0, 1]``."""
    return ((stamps - lo) / max(hi - lo, 1.0)).astype(np.float32)[:, None]


def _read_ratings(
    path: Union[str, os.PathLike],
    max_rows: Optional[int],
    movies: Optional[np.ndarray],
    users: Optional[np.ndarray],
    on_malformed: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads a ratings file, sorts it by time and joins the side features.

    Returns:
        float32 labels ``[N]``, float64 timestamps ``[N]``, int64 hashes ``[N, F]``.
    """
    labels, stamps, hashes = _read(path, _parse_rating, 1, len(RATING_NAMES), max_rows,
                                   on_malformed, progress, header=RATINGS_CSV_HEADER)
    labels, stamps, hashes = _time_sorted(labels, stamps, hashes)
    return labels, stamps, _with_side(hashes, movies, users)


def load_movielens(
    path: Union[str, os.PathLike],
    test_path: Optional[Union[str, os.PathLike]] = None,
    movies_path: Optional[Union[str, os.PathLike]] = None,
    users_path: Optional[Union[str, os.PathLike]] = None,
    test_fraction: float = 0.1,
    max_rows: Optional[int] = None,
    max_test_rows: Optional[int] = None,
    hash_sizes: Optional[HashSizes] = DEFAULT_MAX_HASH_SIZE,
    on_malformed: str = "skip",
    progress: bool = True,
    name: str = "movielens",
) -> tuple[CTRArrays, CTRArrays, DatasetSpec]:
    """Loads MovieLens ratings as a binary (rating >= 4) task.

    Args:
        path: ``ratings.csv`` or ``ratings.dat``.
        test_path: Optional test ratings file of the same kind; if None, the last
            ``test_fraction`` of the ratings in time order is the test split.
        movies_path: Optional ``movies.csv`` / ``movies.dat`` (adds genres, first_genre).
        users_path: Optional ``users.dat`` (adds gender, age, occupation, zip).
        test_fraction: Held-out fraction in (0, 1) when there is no test file.
        max_rows: Read at most this many valid ratings (in file order) from ``path``.
        max_test_rows: Same for ``test_path`` (default: ``max_rows``).
        hash_sizes: Int cap on ``cardinality + 1`` per feature, or one size per
            sparse feature (user_id, movie_id, then the movie and user features).
        on_malformed: ``"skip"`` or ``"fail"``, for every file read.
        progress: Show tqdm progress bars.
        name: Name recorded in the returned spec.

    Returns:
        ``(train, test, spec)``: dense float32 ``[N, 1]`` (scaled timestamp), sparse
        int64 ``[N, F]``, labels float32 ``[N]`` for each split, and the spec.

    Raises:
        FileNotFoundError: If a given file does not exist.
        ValueError: On an empty file, an unknown file type, a wrong CSV header, no
            valid rows, or a malformed line in fail mode.
    """
    names, movies, users = RATING_NAMES, None, None
    if movies_path is not None:
        movies = _read(movies_path, _parse_movie, 0, 3, None, on_malformed, progress,
                       header=["movieId", "title", "genres"])[2]
        names += MOVIE_NAMES
    if users_path is not None:
        users = _read(users_path, _parse_user, 0, 1 + len(USER_NAMES), None, on_malformed,
                      progress)[2]
        names += USER_NAMES
    labels, stamps, hashes = _read_ratings(path, max_rows, movies, users, on_malformed, progress)
    if test_path is None:
        train_end = tail_split_point(len(labels), test_fraction)
        lo, hi = stamps[0], stamps[train_end - 1]
        test_raw = None
    else:
        lo, hi = stamps[0], stamps[-1]
        test_max = max_rows if max_test_rows is None else max_test_rows
        t_labels, t_stamps, t_hashes = _read_ratings(test_path, test_max, movies, users,
                                                     on_malformed, progress)
        test_raw = RawRows(labels=t_labels, dense=_scaled(t_stamps, lo, hi), hashes=t_hashes)
    train_raw = RawRows(labels=labels, dense=_scaled(stamps, lo, hi), hashes=hashes)
    train, test, sizes = build_splits(train_raw, test_raw, test_fraction, hash_sizes, names)
    spec = DatasetSpec(name=name, dense_names=MOVIELENS_DENSE_NAMES, sparse_names=names,
                       num_embeddings=sizes, num_train_examples=len(train))
    return train, test, spec
