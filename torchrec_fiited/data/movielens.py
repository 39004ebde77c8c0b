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

Ratings files are read vectorized and streaming, and cached, as Criteo is (see
:mod:`torchrec_fiited.data.criteo`; a ``.dat`` file is split on single colons and
every other field must be empty). The movie and user side files (at most 62k lines in
MovieLens 25M) keep the Python line parser, whose CSV quoting is the reference, and
are cached the same way. Side features are joined per dictionary entry, not per row.
The sorted rows and their ids are held in memory (the time sort needs the whole file):
about 8 * (2 + side features) + 12 bytes per rating.
"""

import csv
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa

from torchrec_fiited.data.blocks import (
    DEFAULT_BLOCK_SIZE,
    BlockFormat,
    BlockRows,
    ByteBlocks,
    all_empty,
    binary_column,
)
from torchrec_fiited.data.cache import CacheSettings, read_file
from torchrec_fiited.data.common import (
    DEFAULT_MAX_HASH_SIZE,
    MISSING_HASH,
    CTRArrays,
    DatasetSpec,
    HashSizes,
    MalformedLineError,
    ParsedRow,
    RawRows,
    SparseColumn,
    build_splits,
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


class RatingsFormat(BlockFormat):
    """Rating lines for the block reader: ``user,movie,rating,timestamp`` or ``u::m::r::t``.

    A ``.dat`` line is split on single colons into 7 fields, of which the 2nd, 4th
    and 6th must be empty (``::``); anything else fails the block over to the line parser.
    """

    n_dense = 1
    n_sparse = len(RATING_NAMES)
    dense_dtype = np.dtype(np.float64)
    int_columns = True

    def __init__(self, sep: str) -> None:
        """Sets the columns for separator ``","`` (csv) or ``"::"`` (dat)."""
        self.sep = sep
        self._parse = _parse_rating(sep)
        fields = ["user", "movie", "rating", "timestamp"]
        self.gaps = () if sep == "," else ("gap0", "gap1", "gap2")
        if self.gaps:  # u : gap0 : m : gap1 : r : gap2 : t
            fields = [x for pair in zip(fields, self.gaps + ("",)) for x in pair][:-1]
        self.delimiter = sep[0]
        self.column_names = tuple(fields)
        self.column_types = {"user": pa.binary(), "movie": pa.binary(),
                             "rating": pa.float64(), "timestamp": pa.int64(),
                             **{g: pa.binary() for g in self.gaps}}

    def convert(self, table: pa.Table) -> Optional[BlockRows]:
        """Rows of a block; None on an empty id, a rating outside [0, 5] or a missing value."""
        if any(not all_empty(table.column(g)) for g in self.gaps):
            return None
        rating, stamp = table.column("rating"), table.column("timestamp")
        if rating.null_count or stamp.null_count:
            return None
        values = rating.to_numpy()
        if not (np.isfinite(values) & (values >= 0.0) & (values <= 5.0)).all():
            return None
        sparse = (binary_column(table.column("user")), binary_column(table.column("movie")))
        if any((col.dictionary == MISSING_HASH).any() for col in sparse):
            return None
        return BlockRows(labels=(values >= POSITIVE_RATING).astype(np.float32),
                         dense=stamp.to_numpy().astype(np.float64)[:, None], sparse=sparse)

    def parse_line(self, line: str) -> ParsedRow:
        return self._parse(line)


class SideFormat(BlockFormat):
    """A movies or users side file: read only by its line parser (exact CSV quoting)."""

    n_dense = 0
    vectorized = False

    def __init__(self, parse: Callable[[str], ParsedRow], n_sparse: int) -> None:
        """Wraps a line parser giving ``n_sparse`` hashes per line."""
        self._parse = parse
        self.n_sparse = n_sparse

    def convert(self, table: pa.Table) -> Optional[BlockRows]:
        return None

    def parse_line(self, line: str) -> ParsedRow:
        return self._parse(line)


@dataclass(frozen=True)
class _ReadOptions:
    """Options shared by every file of one load."""

    on_malformed: str
    progress: bool
    cache: CacheSettings
    block_size: int


def _read(
    path: Union[str, os.PathLike],
    reader: str,
    make_format: Callable[[str], BlockFormat],
    max_rows: Optional[int],
    options: _ReadOptions,
    header: Optional[list[str]] = None,
) -> RawRows:
    """Reads one MovieLens file with the format for its layout.

    Args:
        path: The file (``.csv`` or ``.dat``, optionally ``.gz``).
        reader: Reader name for the cache.
        make_format: Builds the file's format for a separator.
        max_rows: Read at most this many valid rows.
        options: Malformed-line mode, progress bar, cache and block size.
        header: Exact expected CSV header, or None to skip the header unchecked.

    Returns:
        The file's rows.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On an unknown file type, an empty file, a wrong header, no valid
            row, or a bad line in fail mode.
    """
    path = os.fspath(path)
    sep, has_header = _layout(path)

    def make(blocks: ByteBlocks) -> tuple[BlockFormat, dict[str, Any]]:
        if has_header:
            found = blocks.header().split(",")
            if header is not None and found != header:
                raise ValueError(
                    f"{path}, line 1: header {found} differs from the expected {header}"
                )
        return make_format(sep), {}

    rows, _ = read_file(path, reader, make, max_rows, options.on_malformed, options.progress,
                        options.cache, options.block_size)
    return rows


def _lookup(keys: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Joins side features onto keys by hash.

    Args:
        keys: int64 ``[K]`` key hashes (user or movie).
        side: int64 ``[M, 1 + S]``: key hash, then S feature hashes; first row per key wins.

    Returns:
        int64 ``[K, S]`` feature hashes, MISSING_HASH where the key is absent from ``side``.
    """
    uniq, first = np.unique(side[:, 0], return_index=True)
    values = side[first, 1:]
    pos = np.minimum(np.searchsorted(uniq, keys), uniq.size - 1)
    found = uniq[pos] == keys
    return np.where(found[:, None], values[pos], MISSING_HASH)


def _side_columns(key: SparseColumn, side: Optional[np.ndarray]) -> tuple[SparseColumn, ...]:
    """Side-feature columns of rows with key column ``key``, looked up per dictionary entry."""
    if side is None:
        return ()
    looked = _lookup(np.asarray(key.dictionary), side)
    return tuple(SparseColumn(codes=key.codes, dictionary=looked[:, s])
                 for s in range(looked.shape[1]))


def _read_ratings(
    path: Union[str, os.PathLike],
    max_rows: Optional[int],
    movies: Optional[np.ndarray],
    users: Optional[np.ndarray],
    options: _ReadOptions,
) -> tuple[np.ndarray, np.ndarray, tuple[SparseColumn, ...]]:
    """Reads a ratings file, sorts it by time (stable) and joins the side features.

    Returns:
        float32 labels ``[N]``, float64 timestamps ``[N]``, and the sparse columns
        (user, movie, then the movie and the user side features).
    """
    rows = _read(path, "movielens-ratings", RatingsFormat, max_rows, options,
                 header=RATINGS_CSV_HEADER)
    stamps = np.asarray(rows.dense[:, 0])
    order = np.argsort(stamps, kind="stable")
    user, movie = (SparseColumn(codes=np.asarray(col.codes)[order],
                                dictionary=np.asarray(col.dictionary)) for col in rows.sparse)
    columns = (user, movie) + _side_columns(movie, movies) + _side_columns(user, users)
    return np.asarray(rows.labels)[order], stamps[order], columns


def _scaled(stamps: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 ``[N, 1]`` timestamps scaled so that ``[lo, hi]`` maps to ``[0, 1]``."""
    return ((stamps - lo) / max(hi - lo, 1.0)).astype(np.float32)[:, None]


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
    cache: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
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
        cache: Cache the parsed files on disk (the sorted rows and ids stay in memory).
        cache_dir: Cache directory (default: ``.fiited_cache`` next to each file).
        block_size: Bytes of text parsed per block.

    Returns:
        ``(train, test, spec)``: dense float32 ``[N, 1]`` (scaled timestamp), sparse
        int64 ``[N, F]``, labels float32 ``[N]`` for each split, and the spec.

    Raises:
        FileNotFoundError: If a given file does not exist.
        ValueError: On an empty file, an unknown file type, a wrong CSV header, no
            valid rows, or a malformed line in fail mode.
    """
    options = _ReadOptions(on_malformed, progress, CacheSettings(cache, cache_dir), block_size)
    names, movies, users = RATING_NAMES, None, None
    if movies_path is not None:
        movies = _read(movies_path, "movielens-movies",
                       lambda sep: SideFormat(_parse_movie(sep), 1 + len(MOVIE_NAMES)), None,
                       options, header=["movieId", "title", "genres"]).hashes()
        names += MOVIE_NAMES
    if users_path is not None:
        users = _read(users_path, "movielens-users",
                      lambda sep: SideFormat(_parse_user(sep), 1 + len(USER_NAMES)), None,
                      options).hashes()
        names += USER_NAMES
    labels, stamps, columns = _read_ratings(path, max_rows, movies, users, options)
    if test_path is None:
        train_end = tail_split_point(len(labels), test_fraction)
        lo, hi = stamps[0], stamps[train_end - 1]
        test_raw = None
    else:
        lo, hi = stamps[0], stamps[-1]
        test_max = max_rows if max_test_rows is None else max_test_rows
        t_labels, t_stamps, t_columns = _read_ratings(test_path, test_max, movies, users, options)
        test_raw = RawRows(labels=t_labels, dense=_scaled(t_stamps, lo, hi), sparse=t_columns)
    train_raw = RawRows(labels=labels, dense=_scaled(stamps, lo, hi), sparse=columns)
    train, test, sizes = build_splits(train_raw, test_raw, test_fraction, hash_sizes, names)
    spec = DatasetSpec(name=name, dense_names=MOVIELENS_DENSE_NAMES, sparse_names=names,
                       num_embeddings=sizes, num_train_examples=len(train))
    return train, test, spec
