"""The line-by-line readers as they were before the vectorized ones: the tests' reference.

Each file is read whole with Python's text I/O (universal newlines, ``surrogateescape``)
and a format's Python line parser, the rows go into one array per field, and ids come
from ``np.unique`` per feature: the code of ``torchrec_fiited.data`` before blocks.py
and cache.py, kept here so the vectorized readers can be checked against it. The line
parsers themselves (``parse_criteo_line``, ``AvazuFormat.parse_line``, the MovieLens
``_parse_*``) are the library's: the slow path still uses them.
"""

import gzip
import os
from typing import Callable, Optional, Sequence, TextIO

import numpy as np

from torchrec_fiited.data import movielens
from torchrec_fiited.data.avazu import AvazuFormat
from torchrec_fiited.data.common import (
    DEFAULT_MAX_HASH_SIZE,
    MISSING_HASH,
    CTRArrays,
    MalformedLineError,
    MalformedLines,
    ParsedRow,
    RowBuffer,
    hash_sizes_from_cardinalities,
    log_transform_dense,
    require_rows,
    split_tail,
)
from torchrec_fiited.data.criteo import NUM_DENSE, NUM_SPARSE, parse_criteo_line

Loaded = tuple[CTRArrays, CTRArrays, tuple[int, ...]]


def open_text(path: str) -> TextIO:
    """Opens a data file as text (gzip for ``.gz``), as the old readers did."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def read_lines(
    path: str,
    parse_line: Callable[[str], ParsedRow],
    n_dense: int,
    n_sparse: int,
    max_rows: Optional[int] = None,
    on_malformed: str = "skip",
    header: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[str]]:
    """Parses a file line by line.

    Returns:
        float32 labels ``[N]``, float64 raw dense ``[N, n_dense]``, int64 hashes
        ``[N, n_sparse]``, and the header line (None without one).
    """
    path = os.fspath(path)
    malformed = MalformedLines(path, on_malformed)
    buffer = RowBuffer(n_dense, n_sparse)
    with open_text(path) as handle:
        first = handle.readline().rstrip("\r\n") if header else None
        for lineno, line in enumerate(handle, start=2 if header else 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                label, dense, hashes = parse_line(line)
            except MalformedLineError as err:
                malformed.report(lineno, str(err))
                continue
            buffer.append(label, dense, hashes)
            if max_rows is not None and len(buffer) >= max_rows:
                break
    malformed.finish()
    require_rows(len(buffer), path, malformed)
    return (*buffer.arrays(), first)


def ids_from_hashes(hashes: np.ndarray, hash_sizes) -> tuple[np.ndarray, tuple[int, ...]]:
    """The old id assignment: hash sizes from ``np.unique`` cardinalities, then ids per feature."""
    if hash_sizes is None:
        hash_sizes = DEFAULT_MAX_HASH_SIZE
    if isinstance(hash_sizes, (int, np.integer)):
        cards = [np.unique(col[col != MISSING_HASH]).size for col in hashes.T]
        sizes = hash_sizes_from_cardinalities(cards, int(hash_sizes))
    else:
        sizes = tuple(int(s) for s in hash_sizes)
    ids = np.zeros(hashes.shape, dtype=np.int64)
    for f, size in enumerate(sizes):
        col = hashes[:, f]
        present = col != MISSING_HASH
        if size <= 1:
            continue
        values = col[present]
        uniq, inverse = np.unique(values, return_inverse=True)
        if uniq.size + 1 <= size:
            ids[present, f] = inverse.reshape(-1) + 1
        else:
            ids[present, f] = values % (size - 1) + 1
    return ids, sizes


def splits(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], test_fraction: float,
           hash_sizes) -> Loaded:
    """The old build_splits on ``(labels, dense, hashes)`` parts (train, then an optional test)."""
    ids, sizes = ids_from_hashes(np.concatenate([p[2] for p in parts]), hash_sizes)
    everything = CTRArrays(dense=np.concatenate([p[1] for p in parts]), sparse=ids,
                           labels=np.concatenate([p[0] for p in parts]))
    if len(parts) == 1:
        train, test = split_tail(everything, test_fraction)
    else:
        n = len(parts[0][0])
        train, test = everything.take(slice(0, n)), everything.take(slice(n, len(everything)))
    return train, test, sizes


def load_criteo(path, test_path=None, test_fraction=0.1, max_rows=None, hash_sizes=2**20,
                on_malformed="skip") -> Loaded:
    """The old load_criteo."""
    parts = []
    for p in [path] + ([test_path] if test_path is not None else []):
        labels, dense, hashes, _ = read_lines(os.fspath(p), parse_criteo_line, NUM_DENSE,
                                              NUM_SPARSE, max_rows, on_malformed)
        parts.append((labels, log_transform_dense(dense), hashes))
    return splits(parts, test_fraction, hash_sizes)


def load_avazu(path, test_path=None, test_fraction=0.1, max_rows=None, hash_sizes=2**20,
               on_malformed="skip") -> Loaded:
    """The old load_avazu (same header in both files)."""
    parts = []
    for p in [path] + ([test_path] if test_path is not None else []):
        p = os.fspath(p)
        with open_text(p) as fh:
            fmt = AvazuFormat(fh.readline().rstrip("\r\n").split(","), p)
        labels, dense, hashes, _ = read_lines(p, fmt.parse_line, 1, fmt.n_sparse, max_rows,
                                              on_malformed, header=True)
        parts.append((labels, dense.astype(np.float32), hashes))
    return splits(parts, test_fraction, hash_sizes)


def _read_ml(path: str, make_parser, n_dense: int, n_sparse: int, max_rows, on_malformed):
    sep, has_header = movielens._layout(path)
    return read_lines(path, make_parser(sep), n_dense, n_sparse, max_rows, on_malformed,
                      header=has_header)[:3]


def _lookup(keys: np.ndarray, side: np.ndarray) -> np.ndarray:
    uniq, first = np.unique(side[:, 0], return_index=True)
    values = side[first, 1:]
    pos = np.minimum(np.searchsorted(uniq, keys), uniq.size - 1)
    return np.where((uniq[pos] == keys)[:, None], values[pos], MISSING_HASH)


def _ratings(path, max_rows, movies, users, on_malformed):
    labels, stamps, hashes = _read_ml(os.fspath(path), movielens._parse_rating, 1, 2, max_rows,
                                      on_malformed)
    order = np.argsort(stamps[:, 0], kind="stable")
    labels, stamps, hashes = labels[order], stamps[order, 0], hashes[order]
    cols = [hashes]
    if movies is not None:
        cols.append(_lookup(hashes[:, 1], movies))
    if users is not None:
        cols.append(_lookup(hashes[:, 0], users))
    return labels, stamps, np.concatenate(cols, axis=1)


def _scaled(stamps, lo, hi):
    return ((stamps - lo) / max(hi - lo, 1.0)).astype(np.float32)[:, None]


def load_movielens(path, test_path=None, movies_path=None, users_path=None, test_fraction=0.1,
                   max_rows=None, hash_sizes=2**20, on_malformed="skip") -> Loaded:
    """The old load_movielens."""
    movies = users = None
    if movies_path is not None:
        movies = _read_ml(os.fspath(movies_path), movielens._parse_movie, 0, 3, None,
                          on_malformed)[2]
    if users_path is not None:
        users = _read_ml(os.fspath(users_path), movielens._parse_user, 0, 5, None,
                         on_malformed)[2]
    labels, stamps, hashes = _ratings(path, max_rows, movies, users, on_malformed)
    if test_path is None:
        n = len(labels)
        train_end = n - int(round(n * test_fraction))
        lo, hi = stamps[0], stamps[train_end - 1]
        return splits([(labels, _scaled(stamps, lo, hi), hashes)], test_fraction, hash_sizes)
    lo, hi = stamps[0], stamps[-1]
    t_labels, t_stamps, t_hashes = _ratings(test_path, max_rows, movies, users, on_malformed)
    return splits([(labels, _scaled(stamps, lo, hi), hashes),
                   (t_labels, _scaled(t_stamps, lo, hi), t_hashes)], test_fraction, hash_sizes)


def assert_same(new: tuple, reference: Loaded) -> None:
    """Asserts that new ``(train, test, spec)`` equal the reference ``(train, test, sizes)``."""
    (train, test, spec), (r_train, r_test, r_sizes) = new, reference
    assert spec.num_embeddings == r_sizes
    for got, want in ((train, r_train), (test, r_test)):
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.dense, want.dense)
        np.testing.assert_array_equal(got.sparse, want.sparse)
        assert got.sparse.dtype == np.int64 and got.dense.dtype == np.float32


def spy_slow_path(monkeypatch) -> list[int]:
    """Counts the rows that the block reader parses line by line (the slow path).

    Returns:
        A list that gets the number of valid rows of every block parsed line by line.
    """
    from torchrec_fiited.data import blocks

    rows: list[int] = []
    original = blocks.parse_block_lines

    def spy(fmt, raw):
        result = original(fmt, raw)
        rows.append(len(result[0]))
        return result

    monkeypatch.setattr(blocks, "parse_block_lines", spy)
    return rows
