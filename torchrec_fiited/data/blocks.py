"""Streaming, vectorized parsing of delimited text files in line-aligned blocks.

The Criteo, Avazu and MovieLens readers share this machinery:

1. :class:`ByteBlocks` reads a file as bytes (through gzip for ``.gz``) in blocks of
   about ``block_size`` bytes, each cut after its last ``\\n`` so that no line spans
   two blocks. Its progress bar counts file bytes.
2. :func:`read_blocks` parses the blocks on worker threads (pyarrow's C++ CSV parser
   and numpy release the GIL) and hands the results to a :class:`RowSink` in file
   order. At most ``2 * workers`` blocks are in flight, so memory does not grow with
   the file.
3. Per block, :func:`parse_block` takes the fast path: pyarrow reads the block with
   the column types of the file's :class:`BlockFormat`, and the format checks the
   rows with vectorized tests (labels, empty ids, ranges) in ``convert``. A block that
   fails (pyarrow raises on a wrong field count or a value it cannot convert, or
   ``convert`` returns None) is parsed again line by line with the format's Python
   line parser, which is the reference semantics: it names every malformed line and
   why. Line numbers come from counting the line endings of each block (``\\n``,
   ``\\r\\n`` and a lone ``\\r``, as Python's universal newlines do).

Two inputs that pyarrow reads differently from the line parsers always take the slow
path: a block that starts with a UTF-8 byte-order mark (pyarrow drops it; the line
parsers see it as part of the first field), and, for formats with integer columns,
a block that contains ``0x`` or ``0X`` (pyarrow reads ``0x10`` as 16 where ``int()``
rejects it). Every other difference found between the two parsers makes pyarrow
reject a value that Python accepts (``1_000``, ``+5``, a vertical tab), which the slow
path then reads as Python does.

Categorical columns are read as raw bytes and dictionary-encoded per block
(:func:`binary_column`): each block gets a dictionary of its distinct tokens and one
int32 code per row, and only the dictionary is hashed (:func:`crc32_binary`, crc32 of
the raw bytes: the same value as :func:`~torchrec_fiited.data.common.hash_token`,
which crc32s the UTF-8 bytes of the token decoded with ``surrogateescape``). A sparse
feature is stored as :class:`~torchrec_fiited.data.common.SparseColumn`: int32 codes
into the concatenated per-block dictionaries.
"""

import abc
import functools
import gzip
import io
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from torchrec_fiited.data.common import (
    MISSING_HASH,
    READ_WORKERS,
    MalformedLineError,
    MalformedLines,
    ParsedRow,
    RawRows,
    RowBuffer,
    SparseColumn,
    check_data_file,
)

#: Bytes of text per block: 8 MiB, about 33k Criteo lines, parsed fastest (one thread, 1M
#: lines of benchmarks/bench_readers.py: 2.0-2.3 CPU s, against 2.6 at 2 MiB, 3.6 at 1 MiB
#: and 3.2 at 32 MiB).
DEFAULT_BLOCK_SIZE = 8 << 20
#: Tokens up to this many bytes are hashed with per-position tables; longer ones by zlib.
MAX_TABLE_TOKEN = 64

_BOM = b"\xef\xbb\xbf"

#: The text of a block: whole lines, as read from the file.
RawBlock = Union[bytes, bytearray]


@dataclass(frozen=True)
class BlockRows:
    """Rows of one block.

    Attributes:
        labels: float32 ``[n]`` labels in {0, 1}.
        dense: ``[n, n_dense]`` dense features in the format's stored form (dtype of the format).
        sparse: One column per sparse feature; codes index this block's dictionaries.
    """

    labels: np.ndarray
    dense: np.ndarray
    sparse: tuple[SparseColumn, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> "BlockRows":
        """The first ``n`` rows, each dictionary cut down to the entries those rows use."""
        return BlockRows(labels=self.labels[:n], dense=self.dense[:n],
                         sparse=tuple(col.head(n) for col in self.sparse))


@dataclass(frozen=True)
class BadLine:
    """A malformed line of a block.

    Attributes:
        lineno: 1-based line number within the block.
        rows_before: Valid rows of the block before this line.
        reason: What the line parser found wrong.
    """

    lineno: int
    rows_before: int
    reason: str


@dataclass(frozen=True)
class ParsedBlock:
    """A parsed block: its valid rows, its malformed lines and how many lines it spans."""

    rows: BlockRows
    bad: tuple[BadLine, ...]
    num_lines: int


class BlockFormat(abc.ABC):
    """How one file layout is read: pyarrow column types, vectorized checks, the line parser.

    Attributes (set by subclasses):
        delimiter: The single-character field separator given to pyarrow.
        column_names: One name per field of a line.
        column_types: pyarrow type of every column that is converted (the others are
            only counted).
        n_dense: Dense values per row.
        n_sparse: Sparse features per row.
        dense_dtype: numpy dtype of the stored dense values.
        int_columns: Whether pyarrow reads some column as an integer (then blocks
            containing ``0x`` take the slow path).
        vectorized: False for a layout read only by its line parser (small side files
            whose CSV quoting pyarrow would read differently).
    """

    delimiter: str
    column_names: tuple[str, ...]
    column_types: dict[str, pa.DataType]
    n_dense: int
    n_sparse: int
    dense_dtype: np.dtype = np.dtype(np.float32)
    int_columns: bool = False
    vectorized: bool = True

    @abc.abstractmethod
    def convert(self, table: pa.Table) -> Optional[BlockRows]:
        """Turns pyarrow's table of a block into rows with vectorized checks.

        Returns:
            The rows, or None if a row fails a check (the block is then re-read by
            :meth:`parse_line`, which names the line and the problem).
        """

    @abc.abstractmethod
    def parse_line(self, line: str) -> ParsedRow:
        """Parses one line (without its ending) into ``(label, raw dense, hashes)``.

        Raises:
            MalformedLineError: Saying what is wrong with the line.
        """

    def dense_from_raw(self, raw: np.ndarray) -> np.ndarray:
        """Stored dense values from the line parser's raw float64 ``[n, n_dense]``."""
        return raw.astype(self.dense_dtype)

    def read_table(self, raw: RawBlock) -> pa.Table:
        """pyarrow's table of a block (raises ``pa.ArrowInvalid`` on a line it cannot read)."""
        return pacsv.read_csv(
            pa.py_buffer(raw),
            read_options=pacsv.ReadOptions(column_names=list(self.column_names),
                                           block_size=len(raw) + 1, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter, quote_char=False,
                                             escape_char=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                column_types=self.column_types, include_columns=list(self.column_types),
                null_values=[""], strings_can_be_null=False, check_utf8=False),
        )


# ---- vectorized pieces used by the formats ----------------------------------------------------


@functools.lru_cache(maxsize=None)
def _crc_tables(length: int) -> tuple[int, tuple[np.ndarray, ...]]:
    """crc32 of ``length`` zero bytes, and one lookup table per byte pair of a value.

    For messages of one length, crc32 is affine over GF(2):
    ``crc(x) = crc(0...0) ^ XOR_j T_j[x_j]`` with ``T_j[b] = crc(b at position j, zeros
    elsewhere) ^ crc(0...0)``. Bytes ``2p`` and ``2p + 1`` are looked up together in a
    65536-entry table (uint32, 256 KiB), indexed by the little-endian uint16 of the pair;
    a last odd byte gets a 256-entry table. Half the lookups of byte tables: the 26
    dictionaries of a Criteo block hash in 4 ms instead of 24 ms.
    """
    zero = zlib.crc32(bytes(length))
    byte_tables = np.empty((length, 256), dtype=np.uint32)
    buf = bytearray(length)
    for j in range(length):
        for b in range(256):
            buf[j] = b
            byte_tables[j, b] = zlib.crc32(buf) ^ zero
        buf[j] = 0
    pair = np.arange(65536)
    tables = [byte_tables[2 * p][pair & 0xFF] ^ byte_tables[2 * p + 1][pair >> 8]
              for p in range(length // 2)]
    if length % 2:
        tables.append(byte_tables[length - 1])
    return zero, tuple(tables)


def binary_parts(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets int32 ``[n + 1]`` and bytes uint8 of a pyarrow binary/string array (zero-copy)."""
    n = len(values)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=values.offset * 4)
    if buffers[2] is None:  # no value has a byte
        return offsets, np.empty(0, np.uint8)
    data = np.frombuffer(buffers[2], dtype=np.uint8)
    return offsets, data


def _crc_fixed(mat: np.ndarray) -> np.ndarray:
    """uint32 ``[k]`` crc32 of the rows of C-contiguous uint8 ``[k, length <= MAX_TABLE_TOKEN]``."""
    length = mat.shape[1]
    zero, tables = _crc_tables(length)
    pairs = mat[:, :length - length % 2].view("<u2")              # [k, length // 2]
    crc = np.full(mat.shape[0], zero, dtype=np.uint32)
    for p in range(length // 2):
        crc ^= tables[p][pairs[:, p]]
    if length % 2:
        crc ^= tables[-1][mat[:, -1]]
    return crc


def crc32_binary(values: pa.Array) -> np.ndarray:
    """crc32 of every value of a pyarrow binary array, vectorized by value length.

    Args:
        values: Binary (or string) array of n values, without nulls.

    Returns:
        int64 ``[n]``: ``zlib.crc32(value)``, or MISSING_HASH for an empty value.
    """
    offsets, data = binary_parts(values)
    lengths = np.diff(offsets)
    out = np.full(len(values), MISSING_HASH, dtype=np.int64)
    nonempty = lengths > 0
    longest = int(lengths.max(initial=0))
    if 0 < longest <= MAX_TABLE_TOKEN and (lengths[nonempty] == longest).all():
        # One length (Criteo's 8 hex digits): the values' bytes are one [k, length] block.
        mat = data[offsets[0]:offsets[-1]].reshape(-1, longest)
        out[nonempty] = _crc_fixed(mat)
        return out
    for length in np.unique(np.minimum(lengths[nonempty], MAX_TABLE_TOKEN + 1)):
        if length > MAX_TABLE_TOKEN:
            sel = np.flatnonzero(lengths > MAX_TABLE_TOKEN)
            out[sel] = [zlib.crc32(data[offsets[i]:offsets[i + 1]]) for i in sel]
            continue
        sel = np.flatnonzero(lengths == length)
        out[sel] = _crc_fixed(data[offsets[sel][:, None] + np.arange(length)])
    return out


def dictionary_column(
    column: pa.ChunkedArray, hash_values: Callable[[pa.Array], np.ndarray] = crc32_binary
) -> SparseColumn:
    """A dictionary-encoded pyarrow column as codes into its hashed dictionaries.

    Args:
        column: ``dictionary<int32, binary>`` column, one or more chunks.
        hash_values: Hashes a chunk's dictionary (binary ``[s]``) to int64 ``[s]``.

    Returns:
        int32 codes ``[n]`` and int64 hashes ``[S]`` (the chunks' dictionaries, concatenated).
    """
    chunks = column.chunks
    if not chunks:
        return SparseColumn(codes=np.empty(0, np.int32), dictionary=np.empty(0, np.int64))
    if len(chunks) == 1:
        return SparseColumn(codes=chunks[0].indices.to_numpy(),
                            dictionary=hash_values(chunks[0].dictionary))
    sizes = np.array([len(c.dictionary) for c in chunks], dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    codes = np.concatenate([c.indices.to_numpy() + s for c, s in zip(chunks, starts)])
    dictionary = hash_values(pa.concat_arrays([c.dictionary for c in chunks]))
    return SparseColumn(codes=codes.astype(np.int32, copy=False), dictionary=dictionary)


def _packed_keys(array: pa.Array) -> Optional[tuple[np.ndarray, int]]:
    """Each value of a binary array packed into a uint64 key, if all present values are short.

    Returns:
        ``(keys, width)`` when every non-empty value has the same ``width <= 8`` bytes
        and none is all zero bytes: uint64 ``[n]`` keys holding the value's bytes
        (zero-padded), 0 for an empty value. Otherwise None.
    """
    offsets, data = binary_parts(array)
    lengths = np.diff(offsets)
    present = lengths > 0
    width = int(lengths.max(initial=0))
    if not 0 < width <= 8 or np.count_nonzero(lengths == width) != np.count_nonzero(present):
        return None
    values = data[offsets[0]:offsets[-1]].reshape(-1, width)  # the present values, in order
    if width < 8:
        values = np.pad(values, ((0, 0), (0, 8 - width)))
    packed = values.view(np.uint64).reshape(-1)
    if packed.size == len(array):  # nothing missing: the keys are the bytes themselves
        keys = packed
    else:
        keys = np.zeros(len(array), dtype=np.uint64)
        keys[present] = packed
    if np.count_nonzero(keys) != packed.size:
        return None  # a value of zero bytes would read as empty
    return keys, width


def _crc_keys(keys: np.ndarray, width: int) -> np.ndarray:
    """int64 crc32 of the first ``width`` bytes of uint64 keys; MISSING_HASH for key 0."""
    raw = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, 8)[:, :width]
    out = _crc_fixed(np.ascontiguousarray(raw)).astype(np.int64)
    out[keys == 0] = MISSING_HASH
    return out


def _nearly_distinct(keys: np.ndarray) -> bool:
    """Whether at least 90% of an even sample of 4096 keys are distinct.

    On the benchmark data (Criteo cardinalities, skewed), the features over this line
    have per-block dictionaries of 89-93% of the rows, the next one 77%: dictionary
    encoding pays for itself (fewer entries to rank when ids are assigned) below it.
    """
    sample = np.sort(keys[::max(1, keys.size // 4096)])
    return int(np.count_nonzero(sample[1:] != sample[:-1])) + 1 >= 0.9 * sample.size


def binary_column(column: pa.ChunkedArray) -> SparseColumn:
    """A binary pyarrow column as codes into a hashed dictionary of its values.

    Short fixed-width tokens (Criteo's 8 hex digits) are packed into uint64 keys, which
    pyarrow dictionary-encodes faster than strings; a feature whose values are nearly
    all distinct within the block (:func:`_nearly_distinct`) is not encoded at all: each
    row gets its own entry. Other columns are dictionary-encoded as strings. The 26
    columns of an 8 MiB Criteo block (33k rows) take 25 ms to read as binary plus 17 ms
    here, against 54 + 4 ms with pyarrow's CSV dictionary conversion and
    :func:`dictionary_column` (CPU time, one thread).

    Args:
        column: ``binary`` column without nulls (empty values are missing).

    Returns:
        int32 codes ``[n]`` and int64 hashes ``[S]``, every entry used by some row.
    """
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    packed = _packed_keys(array)
    if packed is None:
        encoded = pc.dictionary_encode(array)
        return SparseColumn(codes=encoded.indices.to_numpy(),
                            dictionary=crc32_binary(encoded.dictionary))
    keys, width = packed
    if _nearly_distinct(keys):  # encoding would save little: one entry per row
        return SparseColumn(codes=np.arange(keys.size, dtype=np.int32),
                            dictionary=_crc_keys(keys, width))
    encoded = pc.dictionary_encode(pa.array(keys))
    return SparseColumn(codes=encoded.indices.to_numpy(),
                        dictionary=_crc_keys(encoded.dictionary.to_numpy(), width))


def fixed_width_bytes(column: pa.ChunkedArray, width: int) -> Optional[np.ndarray]:
    """uint8 ``[n, width]`` bytes of a binary column of ``width``-byte values, else None."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets, data = binary_parts(array)
    n = len(array)
    if n and not (np.diff(offsets) == width).all():
        return None
    return data[offsets[0]:offsets[0] + n * width].reshape(n, width)


def labels_01(column: pa.ChunkedArray) -> Optional[np.ndarray]:
    """float32 labels of a binary column whose values are all exactly ``0`` or ``1``, else None."""
    raw = fixed_width_bytes(column, 1)
    if raw is None:
        return None
    digits = raw[:, 0] - np.uint8(ord("0"))
    if (digits > 1).any():
        return None
    return digits.astype(np.float32)


def all_empty(column: pa.ChunkedArray) -> bool:
    """Whether every value of a binary column is empty."""
    return fixed_width_bytes(column, 0) is not None


# ---- parsing a block ------------------------------------------------------------------------


def count_lines(raw: RawBlock) -> int:
    """Line endings in ``raw`` as universal newlines count them (``\\n``, ``\\r\\n``, ``\\r``)."""
    if b"\r" not in raw:  # memchr-fast; numpy counts 3x faster than bytes.count (8 MiB: 1 vs 3 ms)
        return int(np.count_nonzero(np.frombuffer(raw, dtype=np.uint8) == ord("\n")))
    return raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n")


def _fast_path_allowed(fmt: BlockFormat, raw: RawBlock) -> bool:
    """False for the inputs pyarrow reads differently from the line parsers (module docstring)."""
    if raw.startswith(_BOM):
        return False
    if not fmt.int_columns or (b"x" not in raw and b"X" not in raw):
        return True
    return b"0x" not in raw and b"0X" not in raw


def parse_block_lines(fmt: BlockFormat, raw: RawBlock) -> tuple[BlockRows, tuple[BadLine, ...]]:
    """The slow path: parses a block line by line with ``fmt.parse_line``.

    Returns:
        The valid rows and the malformed lines (line numbers within the block).
    """
    buffer = RowBuffer(fmt.n_dense, fmt.n_sparse)
    bad = []
    text = raw.decode("utf-8", "surrogateescape")
    for lineno, line in enumerate(io.StringIO(text, newline=""), start=1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        try:
            label, dense, hashes = fmt.parse_line(line)
        except MalformedLineError as err:
            bad.append(BadLine(lineno, len(buffer), str(err)))
            continue
        buffer.append(label, dense, hashes)
    labels, dense, hashes = buffer.arrays()
    sparse = tuple(SparseColumn.from_hashes(hashes[:, f]) for f in range(fmt.n_sparse))
    return BlockRows(labels=labels, dense=fmt.dense_from_raw(dense), sparse=sparse), tuple(bad)


def parse_block(fmt: BlockFormat, raw: RawBlock) -> ParsedBlock:
    """Parses a block, vectorized when every line passes the format's checks (module docstring)."""
    rows = None
    if fmt.vectorized and _fast_path_allowed(fmt, raw):
        try:
            rows = fmt.convert(fmt.read_table(raw))
        except pa.ArrowInvalid:
            rows = None
    bad: tuple[BadLine, ...] = ()
    if rows is None:
        rows, bad = parse_block_lines(fmt, raw)
    return ParsedBlock(rows=rows, bad=bad, num_lines=count_lines(raw))


# ---- reading a file -------------------------------------------------------------------------


class ByteBlocks:
    """A data file read as line-aligned byte blocks, with a progress bar in file bytes.

    Use as a context manager; :meth:`header` (optional) reads the first line, then
    iterating yields the remaining bytes in blocks (``bytearray``) that each end with
    ``\\n`` (all but possibly the last).
    """

    def __init__(self, path: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 progress: bool = True) -> None:
        """Opens the file.

        Args:
            path: Data file (gzip if it ends in ``.gz``).
            block_size: Bytes read per block; a block is longer when a line is.
            progress: Show a tqdm bar (bytes of the file, compressed size for ``.gz``).

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is empty or block_size < 1.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        check_data_file(path)
        self.path = path
        self.block_size = block_size
        self.first_lineno = 1
        self._raw = open(path, "rb")
        self._stream = gzip.GzipFile(fileobj=self._raw) if path.endswith(".gz") else self._raw
        self._pending = b""
        self._bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                         desc=f"reading {os.path.basename(path)}", disable=not progress,
                         mininterval=1.0)

    def __enter__(self) -> "ByteBlocks":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
        self._stream.close()
        self._raw.close()

    def _read(self) -> bytes:
        chunk = self._stream.read(self.block_size)
        self._progress()
        return chunk

    def _progress(self) -> None:
        self._bar.update(self._raw.tell() - self._bar.n)

    def header(self) -> str:
        """Reads the first line and returns it decoded (``surrogateescape``), without its ending."""
        while b"\n" not in self._pending:
            chunk = self._read()
            if not chunk:
                break
            self._pending += chunk
        ends = [i for i in (self._pending.find(b"\r"), self._pending.find(b"\n")) if i >= 0]
        end = min(ends) if ends else len(self._pending)
        skip = 2 if self._pending[end:end + 2] == b"\r\n" else 1
        line, self._pending = self._pending[:end], self._pending[end + skip:]
        self.first_lineno = 2
        return line.decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[bytearray]:
        while True:
            # Read straight behind the carried-over partial line: the block is never copied.
            start = len(self._pending)
            block = bytearray(start + self.block_size)
            block[:start] = self._pending
            with memoryview(block) as view:
                got = self._stream.readinto(view[start:])
            self._progress()
            if not got:
                if self._pending:
                    yield bytearray(self._pending)
                self._pending = b""
                return
            end = start + got
            cut = block.rfind(b"\n", 0, end) + 1
            self._pending = bytes(block[cut:end]) if cut else bytes(block[:end])
            if cut:
                del block[cut:]
                yield block


class RowSink(abc.ABC):
    """Receives a file's rows block by block, in file order, and stores them.

    Block codes index the block's own dictionaries; the sink turns them into codes
    into the concatenation of all blocks' dictionaries of the feature.
    """

    def __init__(self, n_sparse: int) -> None:
        """Creates an empty sink for rows with ``n_sparse`` sparse features."""
        self.num_rows = 0
        self.dictionary_sizes = [0] * n_sparse

    def append(self, rows: BlockRows) -> None:
        """Stores the rows of the next block.

        Raises:
            ValueError: If a feature's dictionaries would pass 2**31 - 1 entries (int32
                codes; that needs more than 2**31 rows).
        """
        codes = []
        for f, col in enumerate(rows.sparse):
            start = self.dictionary_sizes[f]
            if start + col.dictionary.size > np.iinfo(np.int32).max:
                raise ValueError(
                    f"sparse feature {f}: more than {np.iinfo(np.int32).max} dictionary "
                    "entries (int32 codes); split the file"
                )
            codes.append(col.codes + np.int32(start))
            self.dictionary_sizes[f] = start + col.dictionary.size
        self.num_rows += len(rows)
        self._store(rows.labels, rows.dense, codes, [col.dictionary for col in rows.sparse])

    @abc.abstractmethod
    def _store(self, labels: np.ndarray, dense: np.ndarray, codes: list[np.ndarray],
               dictionaries: list[np.ndarray]) -> None:
        """Stores one block: labels ``[n]``, dense ``[n, D]``, per feature codes and dictionary."""


class MemorySink(RowSink):
    """Keeps the rows in memory, one array per block until :meth:`rows`."""

    def __init__(self, n_sparse: int, n_dense: int, dense_dtype: np.dtype) -> None:
        """Creates an empty sink (``n_dense`` dense values of ``dense_dtype`` per row)."""
        super().__init__(n_sparse)
        self._labels: list[np.ndarray] = [np.empty(0, np.float32)]
        self._dense: list[np.ndarray] = [np.empty((0, n_dense), dense_dtype)]
        self._codes: list[list[np.ndarray]] = [[np.empty(0, np.int32)] for _ in range(n_sparse)]
        self._dicts: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in range(n_sparse)]

    def _store(self, labels: np.ndarray, dense: np.ndarray, codes: list[np.ndarray],
               dictionaries: list[np.ndarray]) -> None:
        self._labels.append(labels)
        self._dense.append(dense)
        for f, (c, d) in enumerate(zip(codes, dictionaries)):
            self._codes[f].append(c)
            self._dicts[f].append(d)

    def rows(self) -> RawRows:
        """All rows stored so far."""
        return RawRows(
            labels=np.concatenate(self._labels),
            dense=np.concatenate(self._dense),
            sparse=tuple(SparseColumn(codes=np.concatenate(c), dictionary=np.concatenate(d))
                         for c, d in zip(self._codes, self._dicts)),
        )


class _Position:
    """Where the reader is: the next block's first line number and the rows kept so far."""

    def __init__(self, lineno: int) -> None:
        self.lineno = lineno
        self.rows = 0


def _take(block: ParsedBlock, pos: _Position, sink: RowSink, max_rows: Optional[int],
          malformed: MalformedLines) -> bool:
    """Reports a block's malformed lines and sinks its rows, up to max_rows.

    A malformed line is reported only if fewer than max_rows rows precede it, as the
    line-by-line reader stops at the max_rows-th row.

    Returns:
        False once max_rows rows have been kept.
    """
    room = len(block.rows) if max_rows is None else min(len(block.rows), max_rows - pos.rows)
    for bad in block.bad:
        if max_rows is None or pos.rows + bad.rows_before < max_rows:
            malformed.report(pos.lineno + bad.lineno - 1, bad.reason)
    sink.append(block.rows if room == len(block.rows) else block.rows.head(room))
    pos.rows += room
    pos.lineno += block.num_lines
    return max_rows is None or pos.rows < max_rows


def read_blocks(
    blocks: ByteBlocks,
    fmt: BlockFormat,
    sink: RowSink,
    max_rows: Optional[int],
    malformed: MalformedLines,
    workers: int = READ_WORKERS,
) -> int:
    """Parses the remaining blocks of a file into ``sink``.

    Args:
        blocks: The open file, positioned after its header if it has one.
        fmt: The file's layout.
        sink: Receives the valid rows in file order.
        max_rows: Stop after this many valid rows (None: read everything).
        malformed: Gets every malformed line (raises on the first in fail mode).
        workers: Parser threads; ``2 * workers`` blocks are in flight at most.

    Returns:
        The number of rows given to ``sink``.

    Raises:
        ValueError: On a malformed line in fail mode.
    """
    pos = _Position(blocks.first_lineno)
    pending: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fiited-read")
    try:
        more = True
        for raw in blocks:
            pending.append(pool.submit(parse_block, fmt, raw))
            while more and len(pending) >= 2 * workers:
                more = _take(pending.popleft().result(), pos, sink, max_rows, malformed)
            if not more:
                break
        while more and pending:
            more = _take(pending.popleft().result(), pos, sink, max_rows, malformed)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # pyarrow's allocator keeps freed blocks for reuse; returning them dropped the RSS
        # after parsing a 2 GB file from 559 to 458 MB (benchmarks/bench_readers.py --rss-check).
        pa.default_memory_pool().release_unused()
    return pos.rows
