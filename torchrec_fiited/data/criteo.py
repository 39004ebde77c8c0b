"""Reader for Criteo Kaggle ``train.txt`` and Criteo Terabyte ``day_N`` files.

Format (both datasets): one example per line, 40 tab-separated fields::

    label \\t I1 ... I13 \\t C1 ... C26

* ``label``: 0 or 1.
* ``I1..I13``: integer counts (may be negative), empty when missing. Transformed
  as in DLRM: missing -> 0, negative -> 0, then ``log(1 + x)``.
* ``C1..C26``: categorical values, 8 hex digits in the public files, empty when
  missing. Hashed and given ids as described in :mod:`torchrec_fiited.data.common`
  (missing -> id 0).

Only labelled files are supported: Criteo Kaggle's ``test.txt`` has no label
column (39 fields) and is reported as malformed. Files ending in ``.gz`` are read
through gzip.

Reading is vectorized and streaming (:mod:`torchrec_fiited.data.blocks`): pyarrow
parses blocks of lines on worker threads, a block with a malformed line is re-read
by :func:`parse_criteo_line` to name the line. Parsed rows and ids are cached next to
the file (:mod:`torchrec_fiited.data.cache`) and returned memory-mapped, so a file of
any size loads in bounded memory and a second load only maps the cache. On disk a
row costs about 230 bytes of parsed data (int32 codes per feature, per-block
dictionaries) and 208 bytes of ids; ``cache=False`` keeps everything in memory
instead (about 450 bytes per row while reading). ``max_rows`` bounds both.

Without a test file, the last ``test_fraction`` of the rows (the files are in time
order) is the test split.
"""

import math
import os
import zlib
from typing import Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES

from torchrec_fiited.data.blocks import (
    DEFAULT_BLOCK_SIZE,
    BlockFormat,
    BlockRows,
    binary_column,
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
    log_transform_dense,
    parse_label,
)

#: Dense feature names (torchrec's ``int_0 .. int_12``).
CRITEO_DENSE_NAMES: tuple[str, ...] = tuple(DEFAULT_INT_NAMES)
#: Sparse feature names (torchrec's ``cat_0 .. cat_25``).
CRITEO_SPARSE_NAMES: tuple[str, ...] = tuple(DEFAULT_CAT_NAMES)
NUM_DENSE = len(CRITEO_DENSE_NAMES)
NUM_SPARSE = len(CRITEO_SPARSE_NAMES)
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE

_NAN = math.nan


def parse_criteo_line(line: str) -> ParsedRow:
    """Parses one Criteo line.

    Args:
        line: The line without its line ending.

    Returns:
        ``(label, raw dense values (13 floats, NaN = missing), 26 token hashes)``.

    Raises:
        MalformedLineError: On a wrong field count, a bad label or a non-integer
            dense value, naming the column and the value.
    """
    parts = line.split("\t")
    if len(parts) != NUM_FIELDS:
        hint = ""
        if len(parts) == NUM_FIELDS - 1:
            hint = (" (an unlabelled file such as Criteo Kaggle test.txt? "
                    "only labelled files are supported)")
        raise MalformedLineError(
            f"expected {NUM_FIELDS} tab-separated fields (label, 13 integer, "
            f"26 categorical), got {len(parts)}{hint}"
        )
    label = parse_label(parts[0], "label")
    dense = []
    for j in range(NUM_DENSE):
        token = parts[1 + j]
        if not token:
            dense.append(_NAN)
            continue
        try:
            dense.append(float(int(token)))
        except ValueError:
            raise MalformedLineError(
                f"dense feature {CRITEO_DENSE_NAMES[j]} (field {j + 2}) has value "
                f"{token!r}, expected an integer or empty"
            ) from None
    hashes = [zlib.crc32(t.encode("utf-8", "surrogateescape")) if t else MISSING_HASH
              for t in parts[1 + NUM_DENSE:]]
    return label, dense, hashes


#: float32 log1p of the counts below its length, rounded from float64 as log_transform_dense does.
_LOG1P_TABLE = np.log1p(np.arange(1 << 16, dtype=np.float64)).astype(np.float32)


def log1p_counts(counts: np.ndarray) -> np.ndarray:
    """:func:`log_transform_dense` of int64 counts (negative -> 0) as float32 ``[n]``.

    Most Criteo counts are small: a table lookup is 9x faster than ``np.log1p``.
    """
    out = _LOG1P_TABLE[np.clip(counts, 0, _LOG1P_TABLE.size - 1)]
    large = counts >= _LOG1P_TABLE.size
    if large.any():
        out[large] = np.log1p(counts[large].astype(np.float64))
    return out


class CriteoFormat(BlockFormat):
    """Criteo lines for the block reader: label and 26 categoricals as bytes, 13 int64 counts."""

    delimiter = "\t"
    column_names = ("label",) + CRITEO_DENSE_NAMES + CRITEO_SPARSE_NAMES
    column_types = {
        "label": pa.binary(),
        **{name: pa.int64() for name in CRITEO_DENSE_NAMES},
        **{name: pa.binary() for name in CRITEO_SPARSE_NAMES},
    }
    n_dense = NUM_DENSE
    n_sparse = NUM_SPARSE
    int_columns = True

    def convert(self, table: pa.Table) -> Optional[BlockRows]:
        """Rows of a block; None if a label is not exactly ``0`` or ``1``."""
        labels = labels_01(table.column("label"))
        if labels is None:
            return None
        dense = np.empty((table.num_rows, NUM_DENSE), dtype=np.float32)
        for j, name in enumerate(CRITEO_DENSE_NAMES):
            dense[:, j] = log1p_counts(pc.fill_null(table.column(name), 0).to_numpy())
        sparse = tuple(binary_column(table.column(name)) for name in CRITEO_SPARSE_NAMES)
        return BlockRows(labels=labels, dense=dense, sparse=sparse)

    def parse_line(self, line: str) -> ParsedRow:
        return parse_criteo_line(line)

    def dense_from_raw(self, raw: np.ndarray) -> np.ndarray:
        return log_transform_dense(raw)


def read_criteo_file(
    path: Union[str, os.PathLike],
    max_rows: Optional[int] = None,
    on_malformed: str = "skip",
    progress: bool = True,
    cache: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> RawRows:
    """Reads a labelled Criteo file into raw rows (from the cache when it holds them).

    Args:
        path: Criteo Kaggle ``train.txt`` or Terabyte ``day_N`` (optionally ``.gz``).
        max_rows: Read at most this many valid rows.
        on_malformed: ``"skip"`` (warn once with line numbers and the count) or
            ``"fail"`` (ValueError naming the file and line).
        progress: Show a tqdm progress bar (bytes of the file).
        cache: Cache the parsed rows on disk and memory-map them.
        cache_dir: Cache directory (default: ``.fiited_cache`` next to the file).
        block_size: Bytes of text parsed per block.

    Returns:
        Labels float32 ``[N]``, dense float32 ``[N, 13]`` (log1p), 26 sparse columns.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is empty, has no valid row, or (fail mode) a bad line.
    """
    rows, _ = read_file(path, "criteo", lambda blocks: (CriteoFormat(), {}), max_rows,
                        on_malformed, progress, CacheSettings(cache, cache_dir), block_size)
    return rows


def load_criteo(
    path: Union[str, os.PathLike],
    test_path: Optional[Union[str, os.PathLike]] = None,
    test_fraction: float = 0.1,
    max_rows: Optional[int] = None,
    max_test_rows: Optional[int] = None,
    hash_sizes: Optional[HashSizes] = DEFAULT_MAX_HASH_SIZE,
    on_malformed: str = "skip",
    progress: bool = True,
    name: str = "criteo",
    cache: bool = True,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[CTRArrays, CTRArrays, DatasetSpec]:
    """Loads a Criteo dataset.

    Args:
        path: Labelled training file (Kaggle ``train.txt`` or Terabyte ``day_N``).
        test_path: Optional labelled test file (e.g. a later Terabyte day); if None,
            the last ``test_fraction`` of ``path``'s rows is the test split.
        test_fraction: Held-out fraction in (0, 1) when there is no test file.
        max_rows: Read at most this many valid rows from ``path``.
        max_test_rows: Same for ``test_path`` (default: ``max_rows``).
        hash_sizes: An int caps every feature's size at ``min(cardinality + 1, cap)``
            (cardinalities counted over train and test); a list of 26 ints gives
            the sizes directly.
        on_malformed: ``"skip"`` or ``"fail"``.
        progress: Show tqdm progress bars.
        name: Name recorded in the returned spec.
        cache: Cache parsed rows and ids on disk and return them memory-mapped
            (copy-on-write); False reads into memory and writes nothing.
        cache_dir: Cache directory (default: ``.fiited_cache`` next to each file).
        block_size: Bytes of text parsed per block (memory per in-flight block).

    Returns:
        ``(train, test, spec)``: dense float32 ``[N, 13]``, sparse int64 ``[N, 26]``,
        labels float32 ``[N]`` for each split, and the dataset spec.

    Raises:
        FileNotFoundError: If a file does not exist.
        ValueError: On an empty file, no valid rows, bad options, or a malformed
            line in fail mode.
    """
    train_raw = read_criteo_file(path, max_rows, on_malformed, progress, cache, cache_dir,
                                 block_size)
    test_raw = None
    if test_path is not None:
        test_max = max_rows if max_test_rows is None else max_test_rows
        test_raw = read_criteo_file(test_path, test_max, on_malformed, progress, cache,
                                    cache_dir, block_size)
    train, test, sizes = cached_splits(train_raw, test_raw, test_fraction, hash_sizes,
                                       CRITEO_SPARSE_NAMES)
    spec = DatasetSpec(
        name=name,
        dense_names=CRITEO_DENSE_NAMES,
        sparse_names=CRITEO_SPARSE_NAMES,
        num_embeddings=sizes,
        num_train_examples=len(train),
    )
    return train, test, spec
