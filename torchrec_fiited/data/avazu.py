"""Reader for the Avazu CTR dataset (Kaggle ``train.csv``, optionally ``.gz``).

Format: a CSV header line, then one example per line::

    id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,
    app_domain,app_category,device_id,device_ip,device_model,device_type,
    device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21

* ``click`` (0/1) is the label; ``id`` is dropped (unique per row).
* Every other column is a categorical feature, named as in the header, ``hour``
  (``YYMMDDHH``) included. Two more categorical features are derived from
  ``hour``: ``hour_of_day`` (0-23) and ``weekday`` (0 = Monday). Values are hashed
  and given ids as in :mod:`torchrec_fiited.data.common` (empty -> id 0).
* Avazu has no dense feature, but DLRM's bottom MLP needs at least one input, so
  one constant dense feature ``const`` = 0.0 is emitted; it carries no information.

Only labelled files are supported: Avazu's ``test.csv`` has no ``click`` column and
is rejected. Without a test file, the last ``test_fraction`` of the rows (the file
is in time order) is the test split. Fields are split on plain commas: Avazu has
no quoted fields.

Reading is vectorized, streaming and cached as for Criteo (see
:mod:`torchrec_fiited.data.criteo`); the derived hour features are computed once per
distinct ``hour`` value of a block.
"""

import datetime
import functools
import os
import zlib
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_fiited.data.blocks import (
    DEFAULT_BLOCK_SIZE,
    BlockFormat,
    BlockRows,
    ByteBlocks,
    binary_column,
    dictionary_column,
    labels_01,
)
from torchrec_fiited.data.cache import CacheSettings, cached_splits, read_file
from torchrec_fiited.data.common import (
    DEFAULT_MAX_HASH_SIZE,
    MISSING_HASH,
    CTRArrays,
    DatasetSpec,
    HashSizes,
    MalformedLineError,
    ParsedRow,
    RawRows,
    parse_label,
)

LABEL_COLUMN = "click"
ID_COLUMN = "id"
HOUR_COLUMN = "hour"
DERIVED_NAMES = ("hour_of_day", "weekday")
AVAZU_DENSE_NAMES = ("const",)
_CONST_DENSE = (0.0,)


@functools.lru_cache(maxsize=100_000)
def _hour_tokens(hour: str) -> tuple[int, int]:
    """Hashes of hour-of-day and weekday for a ``YYMMDDHH`` value (cached: few distinct hours).

    Raises:
        MalformedLineError: If ``hour`` is not a valid ``YYMMDDHH`` date-hour.
    """
    try:
        if len(hour) != 8 or not hour.isdigit():
            raise ValueError("not 8 digits")
        day = datetime.date(2000 + int(hour[:2]), int(hour[2:4]), int(hour[4:6]))
        hh = int(hour[6:])
        if hh > 23:
            raise ValueError("hour > 23")
    except ValueError as err:
        raise MalformedLineError(
            f"column 'hour' has value {hour!r}, expected YYMMDDHH ({err})"
        ) from None
    return zlib.crc32(str(hh).encode()), zlib.crc32(str(day.weekday()).encode())


def _derived_hashes(hours: pa.Array, which: int) -> np.ndarray:
    """int64 hashes of hour-of-day (which=0) or weekday (which=1) for each ``YYMMDDHH`` value.

    Raises:
        MalformedLineError: If a value is not a valid date-hour.
    """
    return np.array([_hour_tokens(h.decode("utf-8", "surrogateescape"))[which]
                     for h in hours.to_pylist()], dtype=np.int64)


class AvazuFormat(BlockFormat):
    """Avazu lines of a given header layout, for the block reader and the line parser."""

    delimiter = ","
    n_dense = len(AVAZU_DENSE_NAMES)

    def __init__(self, header: Sequence[str], path: str) -> None:
        """Locates the label, id and hour columns.

        Args:
            header: Column names from the file's first line.
            path: File name for messages.

        Raises:
            ValueError: If the header lacks ``click`` or ``hour``.
        """
        if LABEL_COLUMN not in header:
            raise ValueError(
                f"{path}, line 1: header has no {LABEL_COLUMN!r} column ({','.join(header)}); "
                "only labelled files are supported (Avazu's test.csv has no labels)"
            )
        if HOUR_COLUMN not in header:
            raise ValueError(f"{path}, line 1: header has no {HOUR_COLUMN!r} column")
        self.num_fields = len(header)
        self.label_index = header.index(LABEL_COLUMN)
        self.hour_index = header.index(HOUR_COLUMN)
        skip = {LABEL_COLUMN, ID_COLUMN}
        self.cat_indices = [i for i, c in enumerate(header) if c not in skip]
        self.sparse_names = tuple(header[i] for i in self.cat_indices) + DERIVED_NAMES
        self.n_sparse = len(self.sparse_names)
        # Positional names: pyarrow needs distinct ones, a header may repeat a name.
        self.column_names = tuple(f"f{i}" for i in range(self.num_fields))
        self.column_types = {f"f{i}": pa.binary() for i in [self.label_index] + self.cat_indices}

    def convert(self, table: pa.Table) -> Optional[BlockRows]:
        """Rows of a block; None if a click is not ``0``/``1`` or an hour is not YYMMDDHH."""
        labels = labels_01(table.column(f"f{self.label_index}"))
        if labels is None:
            return None
        hours = pc.dictionary_encode(table.column(f"f{self.hour_index}"))
        try:
            derived = tuple(dictionary_column(hours, functools.partial(_derived_hashes, which=k))
                            for k in (0, 1))
        except MalformedLineError:
            return None
        sparse = tuple(dictionary_column(hours) if i == self.hour_index
                       else binary_column(table.column(f"f{i}")) for i in self.cat_indices)
        dense = np.zeros((table.num_rows, self.n_dense), dtype=np.float32)
        return BlockRows(labels=labels, dense=dense, sparse=sparse + derived)

    def parse_line(self, line: str) -> ParsedRow:
        """Returns ``(label, (0.0,), hashes)`` for one line.

        Raises:
            MalformedLineError: On a wrong field count, bad click or bad hour.
        """
        parts = line.split(",")
        if len(parts) != self.num_fields:
            raise MalformedLineError(
                f"expected {self.num_fields} comma-separated fields, got {len(parts)}"
            )
        label = parse_label(parts[self.label_index], LABEL_COLUMN)
        hashes = [zlib.crc32(parts[i].encode("utf-8", "surrogateescape")) if parts[i]
                  else MISSING_HASH for i in self.cat_indices]
        hashes.extend(_hour_tokens(parts[self.hour_index]))
        return label, _CONST_DENSE, hashes


def read_avazu_file(
    path: Union[str, os.PathLike],
    max_rows: Optional[int] = None,
    on_malformed: str = "skip",
    progress: bool = True,
    cache: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[RawRows, tuple[str, ...]]:
    """Reads a labelled Avazu CSV file into raw rows (from the cache when it holds them).

    Args:
        path: Avazu ``train.csv`` (optionally ``.gz``) or a file of that layout.
        max_rows: Read at most this many valid rows.
        on_malformed: ``"skip"`` or ``"fail"``.
        progress: Show a tqdm progress bar (bytes of the file).
        cache: Cache the parsed rows on disk and memory-map them.
        cache_dir: Cache directory (default: ``.fiited_cache`` next to the file).
        block_size: Bytes of text parsed per block.

    Returns:
        ``(rows, sparse_names)``: labels float32 ``[N]``, dense float32 ``[N, 1]``
        (zeros), F sparse columns, and the F sparse feature names.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is empty, the header is unusable, no row is
            valid, or (fail mode) a line is malformed.
    """
    path = os.fspath(path)

    def make_format(blocks: ByteBlocks) -> tuple[AvazuFormat, dict[str, Any]]:
        fmt = AvazuFormat(blocks.header().split(","), path)
        return fmt, {"sparse_names": list(fmt.sparse_names)}

    rows, extras = read_file(path, "avazu", make_format, max_rows, on_malformed, progress,
                             CacheSettings(cache, cache_dir), block_size)
    return rows, tuple(extras["sparse_names"])


def load_avazu(
    path: Union[str, os.PathLike],
    test_path: Optional[Union[str, os.PathLike]] = None,
    test_fraction: float = 0.1,
    max_rows: Optional[int] = None,
    max_test_rows: Optional[int] = None,
    hash_sizes: Optional[HashSizes] = DEFAULT_MAX_HASH_SIZE,
    on_malformed: str = "skip",
    progress: bool = True,
    name: str = "avazu",
    cache: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[CTRArrays, CTRArrays, DatasetSpec]:
    """Loads the Avazu dataset.

    Args:
        path: Labelled training CSV.
        test_path: Optional labelled test CSV with the same header; if None, the
            last ``test_fraction`` of ``path``'s rows is the test split.
        test_fraction: Held-out fraction in (0, 1) when there is no test file.
        max_rows: Read at most this many valid rows from ``path``.
        max_test_rows: Same for ``test_path`` (default: ``max_rows``).
        hash_sizes: Int cap on ``cardinality + 1`` per feature, or a list with one
            size per sparse feature (header order, then hour_of_day, weekday).
        on_malformed: ``"skip"`` or ``"fail"``.
        progress: Show tqdm progress bars.
        name: Name recorded in the returned spec.
        cache: Cache parsed rows and ids on disk and return them memory-mapped
            (copy-on-write); False reads into memory and writes nothing.
        cache_dir: Cache directory (default: ``.fiited_cache`` next to each file).
        block_size: Bytes of text parsed per block (memory per in-flight block).

    Returns:
        ``(train, test, spec)``: dense float32 ``[N, 1]`` (constant 0), sparse int64
        ``[N, F]``, labels float32 ``[N]`` for each split, and the dataset spec.

    Raises:
        FileNotFoundError: If a file does not exist.
        ValueError: On an empty file, a bad header, headers that differ between the
            files, no valid rows, or a malformed line in fail mode.
    """
    train_raw, names = read_avazu_file(path, max_rows, on_malformed, progress, cache, cache_dir,
                                       block_size)
    test_raw = None
    if test_path is not None:
        test_max = max_rows if max_test_rows is None else max_test_rows
        test_raw, test_names = read_avazu_file(test_path, test_max, on_malformed, progress,
                                               cache, cache_dir, block_size)
        if test_names != names:
            raise ValueError(
                f"{os.fspath(test_path)}: sparse columns {test_names} differ from "
                f"those of {os.fspath(path)}: {names}"
            )
    train, test, sizes = cached_splits(train_raw, test_raw, test_fraction, hash_sizes, names)
    spec = DatasetSpec(
        name=name,
        dense_names=AVAZU_DENSE_NAMES,
        sparse_names=names,
        num_embeddings=sizes,
        num_train_examples=len(train),
    )
    return train, test, spec
