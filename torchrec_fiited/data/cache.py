"""Cached reading of data files: parsed rows and their ids, memory-mapped from disk.

A file is parsed once (:func:`read_file`, streaming through
:mod:`torchrec_fiited.data.blocks`) into a cache directory, and later loads map the
cached arrays instead of parsing again. The ids of a loader call (train and test file,
``hash_sizes``) are cached the same way (:func:`cached_splits`), so a repeated
``load_criteo`` call only opens memory maps.

Layout. The cache directory (``cache_dir``, default ``.fiited_cache`` next to the data
file) holds one sub-directory ("slot") per parsed file and reader options, and one per
set of ids::

    train.txt.criteo-<digest>/              meta.json labels.npy dense.npy
                                            codes_00.npy dict_00.npy ... (one pair per feature)
    train.txt.criteo-<digest>.ids-<digest>/ meta.json ids.npy

The arrays are ``.npy`` files (``np.load(..., mmap_mode="r")`` opens them): labels
float32 ``[N]``, dense ``[N, n_dense]``, codes int32 ``[N]`` and dictionary int64
``[S_f]`` per feature (see :class:`~torchrec_fiited.data.common.SparseColumn`), ids
int64 ``[F, N]``. Their 128-byte headers are written last, once the row count is known.
meta.json holds the key, the shapes and reader extras (malformed lines, Avazu's column
names).

Keys. A parsed-file slot is keyed on :data:`CACHE_VERSION`, the reader, the file's
absolute path, size and mtime (ns), and ``max_rows``; an ids slot on the keys of its
parsed slots and ``hash_sizes``. The slot *name* depends only on the paths and options
(``max_rows``, ``hash_sizes``), so a changed source rebuilds its slots in place
instead of adding new ones. A slot whose
meta.json is unreadable, whose key differs (source changed, other version) or whose
files do not have the sizes its meta.json implies is rebuilt with a warning. Bump
:data:`CACHE_VERSION` whenever a reader's output changes.

``on_malformed`` is not part of the key: the malformed lines found by a parse are
stored, and a later load replays them (fail mode raises on the first one, skip mode
warns as the parse did). A fail-mode parse that meets a bad line writes no slot.

Atomic writes. A slot is written into a temporary sibling directory (``*.tmp-<pid>-*``)
that is renamed into place once complete, so a crash never leaves a half-written slot;
temporary directories of dead processes are removed by the next build of the slot.
Files are not fsynced: after a power loss a truncated file fails the size check.

Memory. Arrays are written with plain file writes (page cache, not this process's
memory) and read back as copy-on-write memory maps (``np.memmap`` mode ``"c"``): they
read and write like in-memory arrays, writes are never saved, and a page counts toward
the process's resident memory only once it is touched. With a cache, a file of any
size loads with the memory of a few blocks and one feature column.

Disk. A Criteo row costs about 230 bytes of parsed slot and 208 bytes of ids (26 int64),
about 1.8 times the text; pass ``cache_dir`` to put the cache elsewhere, or
``cache=False`` to read into memory without one.
"""

import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from torchrec_fiited.data.blocks import (
    DEFAULT_BLOCK_SIZE,
    BlockFormat,
    ByteBlocks,
    MemorySink,
    RowSink,
    read_blocks,
)
from torchrec_fiited.data.common import (
    CTRArrays,
    HashSizes,
    READ_WORKERS,
    MalformedLines,
    RawRows,
    SparseColumn,
    assemble_splits,
    build_splits,
    check_data_file,
    check_hash_sizes,
    check_max_rows,
    encode_sparse,
    require_rows,
)

logger = logging.getLogger(__name__)

#: Version of the cached layout and of the readers' output; part of every key.
CACHE_VERSION = 1
#: Name of the default cache directory, created next to the data file.
DEFAULT_CACHE_DIRNAME = ".fiited_cache"

_META = "meta.json"


@dataclass(frozen=True)
class CacheSettings:
    """Whether and where parsed files are cached.

    Attributes:
        enabled: Cache parsed rows and ids on disk (False: read into memory, write nothing).
        directory: Cache directory; None puts :data:`DEFAULT_CACHE_DIRNAME` next to
            each data file.
    """

    enabled: bool = True
    directory: Optional[str] = None

    def root_for(self, path: str) -> str:
        """The cache directory for a data file."""
        if self.directory is not None:
            return os.path.abspath(os.fspath(self.directory))
        return os.path.join(os.path.dirname(os.path.abspath(path)), DEFAULT_CACHE_DIRNAME)


def digest(value: Any) -> str:
    """Short stable digest of JSON-able data (16 hex digits of its SHA-1)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _key_difference(found: Any, expected: dict[str, Any]) -> str:
    """Names the key fields that differ, with both values."""
    if not isinstance(found, dict):
        return f"key {found!r} vs {expected!r}"
    fields = sorted(set(found) | set(expected))
    return ", ".join(f"{k}: {found.get(k)!r} vs {expected.get(k)!r}"
                     for k in fields if found.get(k) != expected.get(k))


#: File name -> (dtype, shape) of the arrays implied by a slot's meta.json.
FileShapes = Callable[[dict[str, Any]], dict[str, tuple[np.dtype, tuple[int, ...]]]]


@dataclass(frozen=True)
class CacheSlot:
    """One cache entry: a directory with meta.json and raw array files.

    Attributes:
        path: The slot directory.
        key: What the cached data was built from; must equal meta.json's ``key``.
    """

    path: str
    key: dict[str, Any]

    def load(self, expected_files: FileShapes,
             quiet_fields: tuple[str, ...] = ()) -> Optional[dict]:
        """Reads and checks meta.json; warns and returns None for a slot that must be rebuilt.

        Args:
            expected_files: File name -> (dtype, shape) implied by a meta.json.
            quiet_fields: Key fields whose change is expected (e.g. ids of rows that were
                just parsed again): the rebuild is logged, not warned about.

        Returns:
            The meta data, or None if the slot is absent, corrupt or built from other inputs.
        """
        meta, problem, found = self.inspect(expected_files)
        if problem is None:
            return meta
        if problem:
            msg = f"cache {self.path} {problem}; rebuilding it"
            quiet = isinstance(found, dict) and found != self.key and all(
                found.get(k) == v or k in quiet_fields for k, v in self.key.items())
            logger.log(logging.INFO if quiet else logging.WARNING, msg)
            if not quiet:
                warnings.warn(msg, stacklevel=4)
        return None

    def inspect(self, expected_files: FileShapes) -> tuple[Optional[dict], Optional[str], Any]:
        """Checks the slot without warning.

        Returns:
            ``(meta, problem, key)``: the meta data and None for a usable slot; otherwise
            None, what is wrong ("" for an absent slot) and the key found (if any).
        """
        if not os.path.isdir(self.path):
            return None, "", None
        found = None
        try:
            with open(os.path.join(self.path, _META)) as fh:
                meta = json.load(fh)
            found = meta.get("key")
            if found != self.key:
                difference = _key_difference(found, self.key)
                return None, f"was built from other inputs ({difference})", found
            problem = _array_problem(self.path, expected_files(meta))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return None, f"has no readable {_META} ({type(err).__name__}: {err})", found
        return (meta, None, found) if problem is None else (None, problem, found)


def _array_problem(path: str,
                   expected: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> Optional[str]:
    """Describes the first array file of a slot that is missing or not as expected."""
    for name, (dtype, shape) in expected.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"file {name} is missing"
        with open(file, "rb") as fh:
            np.lib.format.read_magic(fh)
            found = np.lib.format.read_array_header_1_0(fh)
            start = fh.tell()
        if found != (tuple(shape), False, np.dtype(dtype)):
            return (f"file {name} holds {found[2]} {found[0]}, "
                    f"expected {np.dtype(dtype)} {tuple(shape)}")
        nbytes = start + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if os.path.getsize(file) != nbytes:
            return f"file {name} has {os.path.getsize(file)} bytes, expected {nbytes}"
    return None


#: Bytes reserved for the header of every ``.npy`` file (written last, padded with spaces).
_NPY_HEADER = 128


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` version 1.0 header of exactly :data:`_NPY_HEADER` bytes."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(np.dtype(dtype)), tuple(int(d) for d in shape))
    magic = b"\x93NUMPY\x01\x00"
    pad = _NPY_HEADER - len(magic) - 2 - len(text) - 1
    if pad < 0:
        raise ValueError(f"npy header of shape {shape} does not fit {_NPY_HEADER} bytes")
    length = struct.pack("<H", _NPY_HEADER - len(magic) - 2)
    return magic + length + (text + " " * pad + "\n").encode()


class SlotWriter:
    """Writes a slot into a temporary directory and renames it into place on :meth:`commit`.

    Use as a context manager: leaving it without a commit (an exception) removes the
    temporary directory.
    """

    def __init__(self, slot: CacheSlot, expected_files: FileShapes) -> None:
        """Creates the temporary directory (raises OSError if the cache is not writable).

        Args:
            slot: The slot to write.
            expected_files: Its file sizes from a meta.json, to check a slot found in place.
        """
        self.slot = slot
        self.expected_files = expected_files
        _remove_dead_temporaries(os.path.dirname(slot.path))
        self.tmp = f"{slot.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.tmp)
        self._files: dict[str, list] = {}  # name -> [file, dtype, row shape, rows]
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "SlotWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def append(self, name: str, array: np.ndarray) -> None:
        """Appends rows to the ``.npy`` file ``name`` (created on the first call, which fixes
        its dtype and row shape ``array.shape[1:]``)."""
        entry = self._files.get(name)
        if entry is None:
            fh = open(os.path.join(self.tmp, name), "wb")
            fh.write(bytes(_NPY_HEADER))  # the header is written by commit
            entry = self._files[name] = [fh, array.dtype, array.shape[1:], 0]
        fh, dtype, row_shape, rows = entry
        if array.dtype != dtype or array.shape[1:] != row_shape:
            raise ValueError(f"{name}: appending {array.dtype} rows of shape {array.shape[1:]} "
                             f"to {dtype} rows of shape {row_shape}")
        fh.write(np.ascontiguousarray(array).data)
        entry[3] = rows + array.shape[0]

    def create(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        """Creates the ``.npy`` file ``name`` of a known shape, for :meth:`write_at`."""
        fd = os.open(os.path.join(self.tmp, name), os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, _npy_header(dtype, shape), 0)
        os.ftruncate(fd, _NPY_HEADER + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        with self._lock:
            self._fds[name] = fd

    def write_at(self, name: str, offset: int, array: np.ndarray) -> None:
        """Writes an array's bytes at byte ``offset`` of the data of the file ``name``
        (made by :meth:`create`); thread-safe (pwrite)."""
        with self._lock:
            fd = self._fds[name]
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset += _NPY_HEADER
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written

    def _close(self) -> None:
        for name, (fh, dtype, row_shape, rows) in self._files.items():
            if not fh.closed:
                fh.seek(0)
                fh.write(_npy_header(dtype, (rows,) + row_shape))
                fh.close()
        self._files.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def commit(self, meta: dict[str, Any]) -> None:
        """Writes meta.json (with the slot's key) and renames the directory into place."""
        self._close()
        with open(os.path.join(self.tmp, _META), "w") as fh:
            json.dump({"key": self.slot.key, **meta}, fh)
        try:
            os.rename(self.tmp, self.slot.path)
        except OSError:
            # The slot exists. Another process (e.g. another rank) may have just built it:
            # keep theirs, whose readers may have opened it. A stale or corrupt one goes.
            if self.slot.inspect(self.expected_files)[1] is None:
                return
            shutil.rmtree(self.slot.path, ignore_errors=True)
            os.rename(self.tmp, self.slot.path)


def _remove_dead_temporaries(root: str) -> None:
    """Removes the ``*.tmp-<pid>-*`` directories in ``root`` whose process no longer exists."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        _, sep, tail = name.rpartition(".tmp-")
        if not sep:
            continue
        try:
            os.kill(int(tail.split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _committed(slot: CacheSlot, expected_files: FileShapes) -> dict[str, Any]:
    """The meta data of a slot just committed (possibly by another process).

    Raises:
        OSError: If the slot is unusable right after it was written.
    """
    meta, problem, _ = slot.inspect(expected_files)
    if meta is None:
        raise OSError(f"cache {slot.path} {problem or 'is missing'} right after it was written")
    return meta


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11's compile() is not
# thread-safe: two encoder threads opening arrays at once failed a fresh-clone `make test` with
# "SystemError: AST constructor recursion depth mismatch" (a CPython 3.11 bug). One at a time.
_NPY_HEADER_LOCK = threading.Lock()


def open_array(path: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A checked cached ``.npy`` array as a copy-on-write memory map (zeros if it is empty)."""
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    with _NPY_HEADER_LOCK:
        return np.load(path, mmap_mode="c")


# ---- parsed files -------------------------------------------------------------------------------


def _rows_files(meta: dict[str, Any]) -> dict[str, int]:
    """Arrays of a parsed-file slot, from its meta.json."""
    n, dim = int(meta["rows"]), int(meta["dense_dim"])
    if not isinstance(meta["extras"]["malformed"]["count"], int):
        raise TypeError(f"extras.malformed.count is {meta['extras']['malformed']['count']!r}")
    files = {"labels.npy": (np.dtype(np.float32), (n,)),
             "dense.npy": (np.dtype(meta["dense_dtype"]), (n, dim))}
    for f, size in enumerate(meta["dictionary_sizes"]):
        files[f"codes_{f:02d}.npy"] = (np.dtype(np.int32), (n,))
        files[f"dict_{f:02d}.npy"] = (np.dtype(np.int64), (int(size),))
    return files


class SlotColumns(Sequence):
    """The sparse columns of a parsed-file slot; indexing one opens its memory maps."""

    def __init__(self, path: str, num_rows: int, dictionary_sizes: Sequence[int]) -> None:
        """Describes the columns of the slot at ``path``."""
        self.path = path
        self.num_rows = num_rows
        self.dictionary_sizes = tuple(int(s) for s in dictionary_sizes)

    def __len__(self) -> int:
        return len(self.dictionary_sizes)

    def __getitem__(self, f: int) -> SparseColumn:  # type: ignore[override]
        if not 0 <= f < len(self):
            raise IndexError(f"sparse column {f} out of range [0, {len(self)})")
        return SparseColumn(
            codes=open_array(os.path.join(self.path, f"codes_{f:02d}.npy"), np.dtype(np.int32),
                             (self.num_rows,)),
            dictionary=open_array(os.path.join(self.path, f"dict_{f:02d}.npy"),
                                  np.dtype(np.int64), (self.dictionary_sizes[f],)),
        )


def _rows_from_slot(slot: CacheSlot, meta: dict[str, Any]) -> RawRows:
    """Memory-maps the rows of a checked parsed-file slot."""
    n, dim = int(meta["rows"]), int(meta["dense_dim"])
    return RawRows(
        labels=open_array(os.path.join(slot.path, "labels.npy"), np.dtype(np.float32), (n,)),
        dense=open_array(os.path.join(slot.path, "dense.npy"), np.dtype(meta["dense_dtype"]),
                         (n, dim)),
        sparse=SlotColumns(slot.path, n, meta["dictionary_sizes"]),
        origin=(slot.path, digest(slot.key)),
    )


class FileSink(RowSink):
    """Writes rows into a slot being built."""

    def __init__(self, writer: SlotWriter, fmt: BlockFormat) -> None:
        """Creates an empty sink for rows of ``fmt``."""
        super().__init__(fmt.n_sparse)
        self.writer = writer
        self.n_dense = fmt.n_dense
        self.dense_dtype = np.dtype(fmt.dense_dtype)
        writer.append("labels.npy", np.empty(0, np.float32))  # every file exists, typed
        writer.append("dense.npy", np.empty((0, self.n_dense), self.dense_dtype))
        for f in range(fmt.n_sparse):
            writer.append(f"codes_{f:02d}.npy", np.empty(0, np.int32))
            writer.append(f"dict_{f:02d}.npy", np.empty(0, np.int64))

    def _store(self, labels: np.ndarray, dense: np.ndarray, codes: list[np.ndarray],
               dictionaries: list[np.ndarray]) -> None:
        self.writer.append("labels.npy", labels.astype(np.float32, copy=False))
        self.writer.append("dense.npy", dense.astype(self.dense_dtype, copy=False))
        for f, (c, d) in enumerate(zip(codes, dictionaries)):
            self.writer.append(f"codes_{f:02d}.npy", c.astype(np.int32, copy=False))
            self.writer.append(f"dict_{f:02d}.npy", d.astype(np.int64, copy=False))

    def meta(self) -> dict[str, Any]:
        """Shapes of what was written, for meta.json."""
        return {"rows": self.num_rows, "dense_dim": self.n_dense,
                "dense_dtype": self.dense_dtype.str, "dictionary_sizes": self.dictionary_sizes}


#: Parses a file: called with a function that opens the sink for the file's format,
#: returns the reader's extras for meta.json.
ParseFile = Callable[[Callable[[BlockFormat], RowSink]], dict[str, Any]]


def _writable(settings: CacheSettings, path: str) -> Optional[str]:
    """The cache directory for ``path``, created if needed; None (with a warning) if unusable."""
    if not settings.enabled:
        return None
    root = settings.root_for(path)
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {root}")
    except OSError as err:
        msg = (f"cannot use the cache directory {root} ({err}); reading {path} into memory "
               "(pass cache_dir=... to cache elsewhere, or cache=False)")
        logger.warning(msg)
        warnings.warn(msg, stacklevel=4)
        return None
    return root


def cached_rows(
    settings: CacheSettings, path: str, reader: str, options: dict[str, Any], parse: ParseFile
) -> tuple[RawRows, dict[str, Any], bool]:
    """Rows of a data file from its cache slot, parsing it into the slot on a miss.

    Args:
        settings: Cache on or off, and where.
        path: The data file (must exist).
        reader: Reader name, part of the key and of the slot name.
        options: Reader options that change the rows (JSON-able), part of the key.
        parse: Parses the file into the sink it opens (see :data:`ParseFile`).

    Returns:
        ``(rows, extras, hit)``: the rows (memory-mapped when cached), the reader's
        extras, and whether they came from an existing slot.
    """
    root = _writable(settings, path)
    if root is None:
        sinks: list[MemorySink] = []

        def open_memory(fmt: BlockFormat) -> RowSink:
            sinks.append(MemorySink(fmt.n_sparse, fmt.n_dense, fmt.dense_dtype))
            return sinks[0]

        extras = parse(open_memory)
        return sinks[0].rows(), extras, False
    abspath = os.path.abspath(path)
    stat = os.stat(abspath)
    key = {"version": CACHE_VERSION, "reader": reader, "path": abspath, "size": stat.st_size,
           "mtime_ns": stat.st_mtime_ns, "options": options}
    name = f"{os.path.basename(abspath)}.{reader}-{digest([abspath, reader, options])}"
    slot = CacheSlot(os.path.join(root, name), key)
    meta = slot.load(_rows_files)
    if meta is not None:
        return _rows_from_slot(slot, meta), meta["extras"], True
    with SlotWriter(slot, _rows_files) as writer:
        sinks_f: list[FileSink] = []

        def open_file(fmt: BlockFormat) -> RowSink:
            sinks_f.append(FileSink(writer, fmt))
            return sinks_f[0]

        extras = parse(open_file)
        writer.commit({**sinks_f[0].meta(), "extras": extras})
    return _rows_from_slot(slot, _committed(slot, _rows_files)), extras, False


def read_file(
    path: str,
    reader: str,
    make_format: Callable[[ByteBlocks], tuple[BlockFormat, dict[str, Any]]],
    max_rows: Optional[int],
    on_malformed: str,
    progress: bool,
    settings: CacheSettings,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[RawRows, dict[str, Any]]:
    """Reads a data file into rows, from the cache when it holds them.

    Args:
        path: The data file (gzip if it ends in ``.gz``).
        reader: Reader name (cache key and slot name).
        make_format: Given the opened file (positioned at its start), reads its header
            if it has one and returns the file's format and JSON-able reader extras
            (stored in the cache and returned on a hit).
        max_rows: Read at most this many valid rows.
        on_malformed: ``"skip"`` or ``"fail"``, see :class:`MalformedLines`.
        progress: Show a tqdm progress bar while parsing.
        settings: Cache on or off, and where.
        block_size: Bytes of text per parsed block.

    Returns:
        ``(rows, extras)``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is empty, has no valid row, has a malformed line in fail
            mode, or an option is invalid.
    """
    path = os.fspath(path)
    check_max_rows(max_rows)
    malformed = MalformedLines(path, on_malformed)
    check_data_file(path)

    def parse(open_sink: Callable[[BlockFormat], RowSink]) -> dict[str, Any]:
        with ByteBlocks(path, block_size, progress) as blocks:
            fmt, extras = make_format(blocks)
            n = read_blocks(blocks, fmt, open_sink(fmt), max_rows, malformed)
        malformed.finish()
        require_rows(n, path, malformed)
        return {**extras, "malformed": malformed.summary()}

    rows, extras, hit = cached_rows(settings, path, reader, {"max_rows": max_rows}, parse)
    if hit:
        malformed.replay(extras["malformed"])
        malformed.finish()
    return rows, extras


# ---- ids ----------------------------------------------------------------------------------------


def _ids_files(meta: dict[str, Any]) -> dict[str, int]:
    """Arrays of an ids slot, from its meta.json."""
    return {"ids.npy": (np.dtype(np.int64), (len(meta["num_embeddings"]), int(meta["rows"])))}


def _hash_sizes_key(hash_sizes: Optional[HashSizes]) -> Any:
    """The ``hash_sizes`` option as JSON-able data."""
    if hash_sizes is None or isinstance(hash_sizes, (int, np.integer)):
        return None if hash_sizes is None else int(hash_sizes)
    return [int(s) for s in hash_sizes]


def cached_splits(
    train: RawRows,
    test: Optional[RawRows],
    test_fraction: float,
    hash_sizes: Optional[HashSizes],
    sparse_names: Sequence[str],
) -> tuple[CTRArrays, CTRArrays, tuple[int, ...]]:
    """:func:`~torchrec_fiited.data.common.build_splits`, with the ids cached next to the rows.

    Rows held only in memory (no cache) get their ids in memory.

    Returns:
        ``(train, test, sizes)``; with a cache, ``sparse`` is memory-mapped.
    """
    parts = [train] if test is None else [train, test]
    if any(p.origin is None for p in parts):
        return build_splits(train, test, test_fraction, hash_sizes, sparse_names)
    check_hash_sizes(hash_sizes, sparse_names)
    key = {"version": CACHE_VERSION, "parts": [p.origin[1] for p in parts],
           "hash_sizes": _hash_sizes_key(hash_sizes)}
    # One slot per hash_sizes: a sweep over caps finds each of its id sets again.
    name = digest([[p.origin[0] for p in parts], key["hash_sizes"]])
    slot = CacheSlot(f"{train.origin[0]}.ids-{name}", key)
    n = sum(len(p) for p in parts)
    meta = slot.load(_ids_files, quiet_fields=("parts",))  # a changed file warned already
    if meta is None:
        with SlotWriter(slot, _ids_files) as writer:
            writer.create("ids.npy", np.dtype(np.int64), (len(sparse_names), n))

            def store(f: int, row: int, ids: np.ndarray) -> None:
                writer.write_at("ids.npy", (f * n + row) * ids.itemsize, ids)

            sizes = encode_sparse(parts, hash_sizes, sparse_names, store, READ_WORKERS)
            writer.commit({"rows": n, "num_embeddings": list(sizes)})
        meta = _committed(slot, _ids_files)
    ids = open_array(os.path.join(slot.path, "ids.npy"), np.dtype(np.int64), (len(sparse_names), n))
    train_arr, test_arr = assemble_splits(train, test, ids, test_fraction)
    return train_arr, test_arr, tuple(int(s) for s in meta["num_embeddings"])
