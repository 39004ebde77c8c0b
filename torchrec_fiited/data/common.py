"""Shared types and helpers of the data layer.

Every dataset reader produces the same in-memory form, :class:`CTRArrays`:

* ``dense``: float32 ``[N, n_dense]``, already transformed (log1p for counts);
* ``sparse``: int64 ``[N, F]``, exactly one id per example and sparse feature,
  with ``0 <= sparse[:, f] < spec.num_embeddings[f]``;
* ``labels``: float32 ``[N]`` with values in {0, 1};
* ``logits``: optional float32 ``[N]``, the planted true logit (synthetic data only).

The file readers may return these arrays memory-mapped from their cache
(:mod:`torchrec_fiited.data.cache`): copy-on-write, so they read and write like
ordinary arrays, and ``sparse`` is then a transposed view of an ``[F, N]`` array.
:func:`make_batches` cuts such arrays into torchrec
:class:`~torchrec.datasets.utils.Batch` objects.

Categorical encoding (shared by the Criteo, Avazu and MovieLens readers):

1. While reading, each raw token is hashed with a stable 32-bit hash
   (:func:`hash_token`, ``zlib.crc32`` of its bytes; Python's ``hash()`` is salted
   per process and would change the ids from run to run). A missing (empty) value
   is stored as :data:`MISSING_HASH`. The readers keep each sparse feature as a
   :class:`SparseColumn`: a dictionary of hashes and one int32 code per row.
2. After reading (train and test files together, so both use one id space), the
   hash size of each feature is resolved (:func:`hash_size`): by default
   ``min(observed cardinality + 1, cap)`` (:func:`hash_sizes_from_cardinalities`).
3. :func:`dictionary_ids` maps hashes to ids. Id :data:`MISSING_ID` (0) is reserved
   for missing values. When the hash size holds every observed value
   (``size >= cardinality + 1``), present values get collision-free ids
   ``1..cardinality`` in order of their hash; otherwise they get
   ``1 + hash % (size - 1)`` (the hashing trick, with collisions). Plain modulo
   hashing into ``cardinality + 1`` buckets would merge about a third of the
   values of every feature, small ones (weekday, gender) included.
"""

import logging
import os
import sys
import warnings
import zlib
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

logger = logging.getLogger(__name__)

#: Id that every reader gives to a missing (empty) categorical value.
MISSING_ID = 0
#: Raw hash value that marks a missing categorical value before id assignment.
MISSING_HASH = -1
#: Default cap on a feature's hash size when it is derived from the data.
DEFAULT_MAX_HASH_SIZE = 2**20
#: Number of offending line numbers quoted in a skip-mode warning.
MAX_QUOTED_LINES = 10
#: Threads that parse blocks and assign ids, one per core up to 4 (2 blocks in flight per thread).
READ_WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))

HashSizes = Union[int, Sequence[int]]


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset, enough to size a model for it.

    Attributes:
        name: Dataset name, e.g. ``"criteo"``.
        dense_names: Names of the dense features, in column order of ``dense``.
        sparse_names: Names of the sparse features; also the KeyedJaggedTensor keys.
        num_embeddings: Hash size per sparse feature; ids of feature ``f`` are
            always in ``[0, num_embeddings[f])``.
        num_train_examples: Number of training examples, or None if unknown.
    """

    name: str
    dense_names: tuple[str, ...]
    sparse_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    num_train_examples: Optional[int] = None

    def __post_init__(self) -> None:
        if len(self.sparse_names) != len(self.num_embeddings):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.sparse_names)} sparse names but "
                f"{len(self.num_embeddings)} num_embeddings"
            )
        for feat, size in zip(self.sparse_names, self.num_embeddings):
            if size < 1:
                raise ValueError(
                    f"dataset {self.name!r}: feature {feat!r} has num_embeddings "
                    f"{size}, expected >= 1"
                )

    @property
    def num_dense(self) -> int:
        """Number of dense features."""
        return len(self.dense_names)

    @property
    def num_sparse(self) -> int:
        """Number of sparse features."""
        return len(self.sparse_names)


@dataclass(frozen=True)
class CTRArrays:
    """Examples of a CTR dataset held in memory as numpy arrays.

    Attributes:
        dense: float32 ``[N, n_dense]`` transformed dense features.
        sparse: int64 ``[N, F]`` one id per example and sparse feature.
        labels: float32 ``[N]`` click labels in {0, 1}.
        logits: Optional float32 ``[N]`` true logits of a planted label model.
    """

    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    logits: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.dense.ndim != 2 or self.sparse.ndim != 2 or self.labels.ndim != 1:
            raise ValueError(
                f"expected dense [N, D], sparse [N, F], labels [N]; got shapes "
                f"{self.dense.shape}, {self.sparse.shape}, {self.labels.shape}"
            )
        for name, arr in (("dense", self.dense), ("sparse", self.sparse)):
            if arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} rows but labels have {n}")
        if self.logits is not None and self.logits.shape != (n,):
            raise ValueError(f"logits shape {self.logits.shape} != labels shape ({n},)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: Union[slice, np.ndarray]) -> "CTRArrays":
        """Returns the rows selected by ``index`` (a slice or an int64 ``[M]`` array)."""
        return CTRArrays(
            dense=self.dense[index],
            sparse=self.sparse[index],
            labels=self.labels[index],
            logits=None if self.logits is None else self.logits[index],
        )


def concat_arrays(parts: Sequence[CTRArrays]) -> CTRArrays:
    """Concatenates examples row-wise (logits kept only if every part has them)."""
    has_logits = all(p.logits is not None for p in parts)
    return CTRArrays(
        dense=np.concatenate([p.dense for p in parts]),
        sparse=np.concatenate([p.sparse for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        logits=np.concatenate([p.logits for p in parts]) if has_logits else None,
    )


def split_tail(arrays: CTRArrays, test_fraction: float) -> tuple[CTRArrays, CTRArrays]:
    """Holds out the last ``test_fraction`` of the rows as the test split.

    The rows are expected in time order, so the test split is the future.

    Args:
        arrays: All examples, N rows.
        test_fraction: Fraction in (0, 1) of the rows to hold out.

    Returns:
        ``(train, test)`` with ``round(N * test_fraction)`` test rows.

    Raises:
        ValueError: If the fraction is outside (0, 1) or leaves a split empty.
    """
    n = len(arrays)
    n_train = tail_split_point(n, test_fraction)
    return arrays.take(slice(0, n_train)), arrays.take(slice(n_train, n))


def tail_split_point(n: int, test_fraction: float) -> int:
    """Number of training rows when the last ``round(n * test_fraction)`` rows are held out.

    Raises:
        ValueError: If the fraction is outside (0, 1) or leaves a split empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test >= n:
        raise ValueError(
            f"test_fraction {test_fraction} of {n} rows gives {n_test} test rows; "
            "both splits need at least one row"
        )
    return n - n_test


def make_batches(
    arrays: CTRArrays,
    batch_size: int,
    sparse_names: Sequence[str],
    drop_last: bool = False,
) -> list[Batch]:
    """Cuts examples into torchrec batches, in row order.

    Args:
        arrays: N examples; ``arrays.sparse`` has one column per name in ``sparse_names``.
        batch_size: Examples per batch (the last one may be smaller).
        sparse_names: KeyedJaggedTensor keys, one per sparse column.
        drop_last: Drop the final batch if it has fewer than ``batch_size`` rows.

    Returns:
        Batches with dense_features float32 ``[B, n_dense]``, labels float32 ``[B]``
        and sparse_features a KeyedJaggedTensor with one key per sparse feature,
        int64 values ``[F * B]`` (key-major) and int32 lengths ``[F * B]`` all 1.

    Raises:
        ValueError: If batch_size < 1 or the names do not match the sparse columns.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = list(sparse_names)
    if len(keys) != arrays.sparse.shape[1]:
        raise ValueError(
            f"{len(keys)} sparse names but the arrays have {arrays.sparse.shape[1]} "
            "sparse columns"
        )
    dense = torch.from_numpy(np.ascontiguousarray(arrays.dense, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(arrays.labels, dtype=np.float32))
    # Transposed once so every batch's key-major values are a cheap slice + copy.
    sparse_t = torch.from_numpy(np.ascontiguousarray(arrays.sparse.T, dtype=np.int64))
    n = len(arrays)
    batches = []
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        if drop_last and end - start < batch_size:
            break
        size = end - start
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=sparse_t[:, start:end].reshape(-1),
            lengths=torch.ones(len(keys) * size, dtype=torch.int32),
            stride=size,
        )
        batches.append(Batch(dense_features=dense[start:end], sparse_features=kjt,
                             labels=labels[start:end]))
    return batches


def hash_token(token: str) -> int:
    """Stable 32-bit hash of a raw categorical token (crc32 of its UTF-8 bytes).

    Args:
        token: Non-empty raw value, e.g. ``"68fd1e64"``.

    Returns:
        An int in ``[0, 2**32)``, the same in every process and platform.
    """
    return zlib.crc32(token.encode("utf-8", "surrogateescape"))


def hash_sizes_from_cardinalities(cardinalities: Sequence[int], cap: int) -> tuple[int, ...]:
    """Hash size per feature: ``min(cardinality + 1, cap)``; the +1 is the missing slot.

    Args:
        cardinalities: Observed number of distinct present values per feature.
        cap: Largest hash size allowed, >= 1.

    Returns:
        One hash size per feature.

    Raises:
        ValueError: If ``cap < 1`` or a cardinality is negative.
    """
    if cap < 1:
        raise ValueError(f"hash size cap must be >= 1, got {cap}")
    for f, card in enumerate(cardinalities):
        if card < 0:
            raise ValueError(f"feature {f}: cardinality {card} is negative")
    return tuple(min(int(card) + 1, int(cap)) for card in cardinalities)


def check_hash_sizes(hash_sizes: Optional[HashSizes], names: Sequence[str]) -> None:
    """Validates the user's ``hash_sizes`` option (see :func:`hash_size`) against the features.

    Raises:
        ValueError: If a cap is < 1, a list has the wrong length or a size is < 1.
    """
    if hash_sizes is None:
        return
    if isinstance(hash_sizes, (int, np.integer)):
        hash_sizes_from_cardinalities([], int(hash_sizes))
        return
    sizes = tuple(int(s) for s in hash_sizes)
    if len(sizes) != len(names):
        raise ValueError(
            f"hash_sizes has {len(sizes)} entries but there are {len(names)} sparse "
            f"features ({', '.join(names)})"
        )
    for name, size in zip(names, sizes):
        if size < 1:
            raise ValueError(f"hash size of feature {name!r} is {size}, expected >= 1")


def hash_size(hash_sizes: Optional[HashSizes], feature: int, cardinality: int) -> int:
    """Hash size of one feature from the user's ``hash_sizes`` option.

    Args:
        hash_sizes: An int is a cap applied to every feature's observed cardinality
            + 1; a sequence gives the exact size per feature; None means the
            default cap :data:`DEFAULT_MAX_HASH_SIZE`. Validated by
            :func:`check_hash_sizes`.
        feature: Index of the feature.
        cardinality: Distinct present values of the feature (train and test together).

    Returns:
        The feature's hash size.
    """
    if hash_sizes is None:
        hash_sizes = DEFAULT_MAX_HASH_SIZE
    if isinstance(hash_sizes, (int, np.integer)):
        return hash_sizes_from_cardinalities([cardinality], int(hash_sizes))[0]
    return int(hash_sizes[feature])


@dataclass(frozen=True)
class SparseColumn:
    """One sparse feature of N rows, dictionary-encoded: row i has hash ``dictionary[codes[i]]``.

    Every dictionary entry is used by some row; entries may repeat (each block of a
    file has its own dictionary).

    Attributes:
        codes: int32 ``[N]`` indices into ``dictionary``.
        dictionary: int64 ``[S]`` token hashes, MISSING_HASH for a missing value.
    """

    codes: np.ndarray
    dictionary: np.ndarray

    @staticmethod
    def from_hashes(hashes: np.ndarray) -> "SparseColumn":
        """Encodes int64 hashes ``[N]`` (one dictionary entry per distinct hash)."""
        dictionary, codes = np.unique(hashes, return_inverse=True)
        return SparseColumn(codes=codes.reshape(-1).astype(np.int32), dictionary=dictionary)

    def hashes(self) -> np.ndarray:
        """int64 ``[N]`` hash of every row."""
        return self.dictionary[self.codes]

    def head(self, n: int) -> "SparseColumn":
        """The first ``n`` rows, with the dictionary cut down to the entries they use."""
        used, codes = np.unique(self.codes[:n], return_inverse=True)
        return SparseColumn(codes=codes.reshape(-1).astype(np.int32),
                            dictionary=self.dictionary[used])


@dataclass(frozen=True)
class RawRows:
    """Parsed rows of one file before categorical ids are assigned.

    Attributes:
        labels: float32 ``[N]`` labels in {0, 1}.
        dense: ``[N, n_dense]`` dense features (float32 transformed, or the reader's raw form).
        sparse: One :class:`SparseColumn` per sparse feature, F in all. A cached file
            opens each column's memory maps when it is indexed, so a column's pages
            are released once it is no longer referenced.
        origin: ``(cache slot path, key digest)`` of a cached parse, None for rows held
            only in memory; it keys the cache of ids derived from these rows.
    """

    labels: np.ndarray
    dense: np.ndarray
    sparse: Sequence[SparseColumn]
    origin: Optional[tuple[str, str]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def hashes(self) -> np.ndarray:
        """int64 ``[N, F]`` hashes of every row and feature (materialized in memory)."""
        n_sparse = len(self.sparse)
        out = np.empty((len(self), n_sparse), dtype=np.int64)
        for f in range(n_sparse):
            out[:, f] = self.sparse[f].hashes()
        return out


def dictionary_ids(
    dictionaries: Sequence[np.ndarray], hash_sizes: Optional[HashSizes], feature: int
) -> tuple[np.ndarray, int]:
    """Ids of the dictionary entries of one feature, over parts that share one id space.

    Args:
        dictionaries: The feature's int64 dictionary (hashes in ``[0, 2**32)`` or
            MISSING_HASH) in each part, ``[S_p]``.
        hash_sizes: See :func:`hash_size`.
        feature: Index of the feature.

    Returns:
        ``(ids, size)``: int32 ``[sum S_p]`` id of every entry, the parts' entries one
        after the other (``0 <= id < size``, missing -> MISSING_ID; see the module
        docstring), and the feature's hash size.
    """
    return _value_ids(*_present_values(dictionaries), hash_sizes, feature)


def _present_values(dictionaries: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bool ``[S]`` presence of every entry, and the present hashes as uint32 (half the bytes)."""
    total = sum(int(d.size) for d in dictionaries)
    present = np.empty(total, dtype=bool)
    values32 = np.empty(total, dtype=np.uint32)
    start = 0
    for d in dictionaries:
        np.not_equal(d, MISSING_HASH, out=present[start:start + d.size])
        values32[start:start + d.size] = d  # MISSING_HASH wraps; masked out below
        start += d.size
    return present, values32[present]


def _value_ids(present: np.ndarray, values: np.ndarray, hash_sizes: Optional[HashSizes],
               feature: int) -> tuple[np.ndarray, int]:
    """:func:`dictionary_ids` from the output of :func:`_present_values`."""
    # Exact ids need every entry's rank; the hashing trick only needs the cardinality (a
    # plain sort, 4x faster). Rank at once when no cardinality could need the trick.
    ranks, cardinality = None, 0
    if values.size + 1 <= hash_size(hash_sizes, feature, values.size):
        ranks, cardinality = _ranks(values)
    else:
        cardinality = _cardinality(values)
    size = hash_size(hash_sizes, feature, cardinality)
    ids = np.zeros(present.size, dtype=np.int32)
    if size <= 1:  # a single slot: every value shares id 0
        return ids, size
    if cardinality + 1 <= size:  # exact vocabulary: ids 1..cardinality in hash order
        ids[present] = ranks if ranks is not None else _ranks(values)[0]
    else:
        ids[present] = values % np.uint32(size - 1) + np.uint32(1)
    return ids, size


def _cardinality(values: np.ndarray) -> int:
    """Distinct values of a uint32 array (a SIMD sort beats hashing: no cache misses)."""
    in_order = np.sort(values)
    return int(np.count_nonzero(in_order[1:] != in_order[:-1])) + int(in_order.size > 0)


def _ranks(values: np.ndarray) -> tuple[np.ndarray, int]:
    """1-based rank of each value among the distinct values (int32 ``[k]``), and their number.

    Sorts ``value << 32 | position`` as uint64 instead of an argsort: 26 ms against 46 ms
    for 1M values, and no int64 permutation.
    """
    packed = values.astype(np.uint64) << np.uint64(32)
    packed |= np.arange(values.size, dtype=np.uint64)
    packed.sort()
    halves = packed.view(np.uint32).reshape(-1, 2)
    position, value = (halves[:, 0], halves[:, 1]) if sys.byteorder == "little" \
        else (halves[:, 1], halves[:, 0])
    in_order = np.empty(values.size, dtype=np.int32)
    in_order[:1] = 1
    np.not_equal(value[1:], value[:-1], out=in_order[1:], casting="unsafe")
    np.cumsum(in_order, out=in_order)  # the rank of each value in sorted order
    ranks = np.empty(values.size, dtype=np.int32)
    ranks[position] = in_order
    return ranks, int(in_order[-1]) if in_order.size else 0


#: Rows (or entries) processed at a time while assigning ids: bounds the temporaries.
_ID_CHUNK = 1 << 20


def run_bounded(fn: Callable[[int], Any], costs: Sequence[int], workers: int,
                budget: int) -> list[Any]:
    """``[fn(i) for i in range(len(costs))]`` on ``workers`` threads, within a memory budget.

    Task i is started only while the costs of the started, unfinished tasks plus its own
    stay within ``budget`` bytes, or when no other task is running (a task over the
    budget runs alone).

    Returns:
        The results in task order; the first exception of a task is raised.
    """
    if workers <= 1:
        return [fn(i) for i in range(len(costs))]
    results: list[Any] = [None] * len(costs)
    running: dict[Future, tuple[int, int]] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fiited-ids") as pool:
        for i, cost in enumerate(costs):
            while running and sum(c for _, c in running.values()) + cost > budget:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)[0]] = future.result()
            running[pool.submit(fn, i)] = (i, cost)
        for future, (i, _) in running.items():
            results[i] = future.result()
    return results


#: Bytes the id assignment may hold at once over its threads (a feature over it runs alone).
ID_MEMORY_BUDGET = 320 << 20
#: Bytes held per dictionary entry while a feature gets its ids: the tracemalloc peak of
#: dictionary_ids on the exact path is 24 (copies, sort, ranks); the mapped dictionary
#: (8 more) is released before the sort.
_ID_BYTES_PER_ENTRY = 25


def encode_sparse(
    parts: Sequence[RawRows],
    hash_sizes: Optional[HashSizes],
    sparse_names: Sequence[str],
    store: Callable[[int, int, np.ndarray], None],
    workers: int = 1,
) -> tuple[int, ...]:
    """Assigns ids feature by feature over all parts, in bounded memory.

    Args:
        parts: Rows of the files that share the id space (train, then test).
        hash_sizes: See :func:`hash_size`.
        sparse_names: Names of the F sparse features.
        store: Called as ``store(f, row, ids)`` with int64 ids of feature f for rows
            ``row, row + 1, ...`` (train rows first, then test rows), at most 2**20 rows
            at a time; with ``workers > 1`` from several threads, for different features.
        workers: Threads that assign ids; features run in parallel while their
            estimated memory stays within :data:`ID_MEMORY_BUDGET`.

    Returns:
        The hash size of every feature.

    Raises:
        ValueError: If ``hash_sizes`` is invalid for these features.
    """
    check_hash_sizes(hash_sizes, sparse_names)
    row_starts = np.cumsum([0] + [len(p) for p in parts])

    def encode(f: int) -> int:
        columns = [p.sparse[f] for p in parts]
        codes = [c.codes for c in columns]
        ends = np.cumsum([c.dictionary.size for c in columns])
        present, values = _present_values([c.dictionary for c in columns])
        del columns  # a cached dictionary's memory map is released before the sort
        entry_ids, size = _value_ids(present, values, hash_sizes, f)
        del present, values
        for part_codes, row, start, end in zip(codes, row_starts, np.r_[0, ends[:-1]], ends):
            table = entry_ids[start:end]
            for i in range(0, part_codes.size, _ID_CHUNK):
                store(f, int(row) + i, table[part_codes[i:i + _ID_CHUNK]].astype(np.int64))
        return size

    costs = [_ID_BYTES_PER_ENTRY * sum(p.sparse[f].dictionary.size for p in parts)
             for f in range(len(sparse_names))]
    return tuple(run_bounded(encode, costs, workers, ID_MEMORY_BUDGET))


def assemble_splits(
    train: RawRows, test: Optional[RawRows], ids: np.ndarray, test_fraction: float
) -> tuple[CTRArrays, CTRArrays]:
    """The train and test arrays from parsed rows and their ids.

    Args:
        train: Rows of the training file, in file (time) order.
        test: Rows of a separate test file, or None to hold out the tail of ``train``.
        ids: int64 ``[F, N_train + N_test]`` ids, train rows first.
        test_fraction: Fraction of ``train`` held out when ``test`` is None.

    Returns:
        ``(train, test)``; ``sparse`` is a view of ``ids.T``, nothing is copied.
    """
    sparse = ids.T
    if test is None:
        return split_tail(CTRArrays(dense=train.dense, sparse=sparse, labels=train.labels),
                          test_fraction)
    n = len(train)
    return (CTRArrays(dense=train.dense, sparse=sparse[:n], labels=train.labels),
            CTRArrays(dense=test.dense, sparse=sparse[n:], labels=test.labels))


def build_splits(
    train: RawRows,
    test: Optional[RawRows],
    test_fraction: float,
    hash_sizes: Optional[HashSizes],
    sparse_names: Sequence[str],
) -> tuple[CTRArrays, CTRArrays, tuple[int, ...]]:
    """Assigns ids over train and test together in memory, then returns the two splits.

    Args:
        train: Rows of the training file, in file (time) order.
        test: Rows of a separate test file, or None to hold out the tail of ``train``.
        test_fraction: Fraction of ``train`` held out when ``test`` is None.
        hash_sizes: See :func:`hash_size`.
        sparse_names: Names of the F sparse features.

    Returns:
        ``(train, test, sizes)`` arrays and the hash size per sparse feature.
    """
    parts = [train] if test is None else [train, test]
    ids = np.empty((len(sparse_names), sum(len(p) for p in parts)), dtype=np.int64)

    def store(f: int, row: int, chunk: np.ndarray) -> None:
        ids[f, row:row + chunk.size] = chunk

    sizes = encode_sparse(parts, hash_sizes, sparse_names, store, READ_WORKERS)
    train_arr, test_arr = assemble_splits(train, test, ids, test_fraction)
    return train_arr, test_arr, sizes


def log_transform_dense(raw: np.ndarray) -> np.ndarray:
    """The DLRM dense transform: missing (NaN) -> 0, negative -> 0, then log(1 + x).

    Args:
        raw: float64 ``[N, D]`` raw integer counts, NaN where missing.

    Returns:
        float32 ``[N, D]`` transformed values.
    """
    clean = np.nan_to_num(raw, nan=0.0)
    return np.log1p(np.maximum(clean, 0.0)).astype(np.float32)


class MalformedLines:
    """Counts malformed input lines and skips them with one warning, or fails fast.

    Use :meth:`report` for each bad line, then :meth:`finish` after reading.
    """

    def __init__(self, path: Union[str, os.PathLike], on_malformed: str) -> None:
        """Creates the counter.

        Args:
            path: File being read, quoted in messages.
            on_malformed: ``"skip"`` (drop the line, warn once at the end) or
                ``"fail"`` (raise on the first bad line).

        Raises:
            ValueError: If on_malformed is neither value.
        """
        if on_malformed not in ("skip", "fail"):
            raise ValueError(f"on_malformed must be 'skip' or 'fail', got {on_malformed!r}")
        self.path = os.fspath(path)
        self.on_malformed = on_malformed
        self.count = 0
        self.examples: list[tuple[int, str]] = []

    def report(self, lineno: int, reason: str) -> None:
        """Records a malformed line.

        Args:
            lineno: 1-based line number in the file.
            reason: What is wrong, naming the field and the bad value.

        Raises:
            ValueError: In fail mode, naming the file, line and reason.
        """
        if self.on_malformed == "fail":
            raise ValueError(f"{self.path}, line {lineno}: malformed line: {reason}")
        self.count += 1
        if len(self.examples) < MAX_QUOTED_LINES:
            self.examples.append((lineno, reason))

    def finish(self) -> None:
        """Warns once (``warnings.warn`` and the logger) if lines were skipped."""
        if self.count == 0:
            return
        quoted = "; ".join(f"line {n}: {r}" for n, r in self.examples)
        more = f" (first {len(self.examples)} shown)" if self.count > len(self.examples) else ""
        msg = f"{self.path}: skipped {self.count} malformed line(s){more}: {quoted}"
        logger.warning(msg)
        warnings.warn(msg, stacklevel=3)

    def summary(self) -> dict[str, Any]:
        """The count and the quoted lines, as JSON-able data for a cache."""
        return {"count": self.count, "examples": [list(e) for e in self.examples]}

    def replay(self, summary: dict[str, Any]) -> None:
        """Records the malformed lines of a :meth:`summary` as if they had just been read.

        Raises:
            ValueError: In fail mode, naming the first malformed line.
        """
        if summary["count"] and self.on_malformed == "fail":
            lineno, reason = summary["examples"][0]
            self.report(lineno, reason)
        self.count += int(summary["count"])
        self.examples.extend((int(n), str(r)) for n, r in summary["examples"])
        del self.examples[MAX_QUOTED_LINES:]


def check_data_file(path: str) -> None:
    """Checks that a data file exists and is not empty.

    Raises:
        FileNotFoundError: If the path does not exist or is not a file.
        ValueError: If the file is empty.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file is empty: {path}")


def require_rows(n_rows: int, path: str, malformed: MalformedLines) -> None:
    """Raises ValueError naming ``path`` if no valid row was read from it."""
    if n_rows == 0:
        raise ValueError(
            f"{path}: no valid data rows ({malformed.count} malformed line(s) skipped)"
        )


def check_max_rows(max_rows: Optional[int]) -> None:
    """Raises ValueError unless max_rows is None or >= 1."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be None or >= 1, got {max_rows}")


class MalformedLineError(ValueError):
    """Raised by a line parser to say why a line is malformed (caught by the reader)."""


class RowBuffer:
    """Compact growable storage for parsed rows (8 bytes per value, not a Python object)."""

    def __init__(self, n_dense: int, n_sparse: int) -> None:
        """Creates an empty buffer for rows of ``n_dense`` raw dense and ``n_sparse`` hashes."""
        self.n_dense = n_dense
        self.n_sparse = n_sparse
        self._labels = array("f")
        self._dense = array("d")
        self._hashes = array("q")

    def __len__(self) -> int:
        return len(self._labels)

    def append(self, label: float, dense: Sequence[float], hashes: Sequence[int]) -> None:
        """Adds one row: a label, ``n_dense`` raw dense values (NaN = missing), the hashes."""
        self._labels.append(label)
        self._dense.extend(dense)
        self._hashes.extend(hashes)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns labels float32 ``[N]``, raw dense float64 ``[N, D]``, hashes int64 ``[N, F]``."""
        n = len(self._labels)
        labels = np.frombuffer(self._labels, dtype=np.float32).copy()
        dense = np.frombuffer(self._dense, dtype=np.float64).reshape(n, self.n_dense).copy()
        hashes = np.frombuffer(self._hashes, dtype=np.int64).reshape(n, self.n_sparse).copy()
        return labels, dense, hashes


ParsedRow = tuple[float, Sequence[float], Sequence[int]]


def parse_label(token: str, column: str) -> float:
    """Parses a 0/1 label.

    Raises:
        MalformedLineError: Naming the column and the value if it is not "0" or "1".
    """
    if token == "0":
        return 0.0
    if token == "1":
        return 1.0
    raise MalformedLineError(f"label column {column!r} has value {token!r}, expected 0 or 1")
