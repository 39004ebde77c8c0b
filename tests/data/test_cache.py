"""Tests of the on-disk cache: reuse, invalidation, corruption, atomic writes, fallbacks."""

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data import reference
from torchrec_fiited.data import cache as cache_module
from torchrec_fiited.data.avazu import load_avazu
from torchrec_fiited.data.cache import DEFAULT_CACHE_DIRNAME
from torchrec_fiited.data.criteo import load_criteo, parse_criteo_line, read_criteo_file
from torchrec_fiited.data.movielens import load_movielens

ROWS = 120


def _criteo_file(path: Path, seed: int = 0, n: int = ROWS, bad_line: bool = False) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        ints = ["" if rng.random() < 0.2 else str(rng.randint(-3, 99)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.randint(0, 40):08x}" for _ in range(26)]
        lines.append("\t".join([str(rng.randint(0, 1))] + ints + cats))
    if bad_line:
        lines[7] = "2" + lines[7][1:]
    path.write_text("".join(line + "\n" for line in lines))
    return path


class Counter:
    """Counts calls of a module function replaced by a pass-through spy."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.calls = 0
        original = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, Counter]:
    """(parses of a file, id assignments) as counted in the cache module."""
    return (Counter(monkeypatch, cache_module, "read_blocks"),
            Counter(monkeypatch, cache_module, "encode_sparse"))


def _load(path: Path, **kw):
    kw.setdefault("progress", False)
    return load_criteo(path, **kw)


def _in_memory(loaded):
    """A loader's result copied out of its memory maps (before a test damages the files)."""
    train, test, spec = loaded
    return tuple(type(a)(dense=np.array(a.dense), sparse=np.array(a.sparse),
                         labels=np.array(a.labels)) for a in (train, test)) + (spec,)


def _same(a, b) -> None:
    for x, y in zip(a[:2], b[:2]):
        for field in ("labels", "dense", "sparse"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    assert a[2] == b[2]


def test_second_load_maps_the_cache_without_parsing(tmp_path: Path, counters) -> None:
    parses, encodes = counters
    path = _criteo_file(tmp_path / "train.txt")
    first = _load(path)
    assert (parses.calls, encodes.calls) == (1, 1)
    second = _load(path)
    assert (parses.calls, encodes.calls) == (1, 1)  # nothing parsed or encoded again
    _same(first, second)
    assert isinstance(second[0].sparse.base, np.memmap) or isinstance(second[0].sparse, np.memmap)
    assert isinstance(second[0].dense, np.memmap) and isinstance(second[1].labels, np.memmap)
    slot = sorted((tmp_path / DEFAULT_CACHE_DIRNAME).iterdir())[0]
    assert slot.name.startswith("train.txt.criteo-")
    assert np.load(slot / "dense.npy", mmap_mode="r").shape == (ROWS, 13)  # plain .npy files
    np.testing.assert_array_equal(np.load(slot / "labels.npy"),
                                  np.concatenate([first[0].labels, first[1].labels]))
    _load(path, hash_sizes=5)  # other ids, same parsed rows
    _load(path)
    assert (parses.calls, encodes.calls) == (1, 2)
    _same(second, _load(path, cache=False))


def test_changed_source_is_parsed_again(tmp_path: Path, counters) -> None:
    parses, _ = counters
    path = _criteo_file(tmp_path / "train.txt", seed=0)
    old = _load(path)
    stat = os.stat(path)
    _criteo_file(path, seed=1)  # same length, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.warns(UserWarning, match=r"was built from other inputs \(mtime_ns: \d+ vs \d+"):
        new = _load(path)
    assert parses.calls == 2
    assert not np.array_equal(old[0].labels, new[0].labels)
    reference.assert_same(new, reference.load_criteo(path))
    assert len(os.listdir(tmp_path / DEFAULT_CACHE_DIRNAME)) == 2  # rebuilt in place: rows + ids


@pytest.mark.parametrize("damage", ["truncate codes", "garbage meta", "other key", "no dict file",
                                    "other dtype"])
def test_corrupt_slot_is_rebuilt_with_a_warning(tmp_path: Path, counters, damage: str) -> None:
    parses, _ = counters
    path = _criteo_file(tmp_path / "train.txt")
    want = _in_memory(_load(path))
    root = tmp_path / DEFAULT_CACHE_DIRNAME
    slot = next(p for p in root.iterdir() if ".ids-" not in p.name)
    if damage == "truncate codes":
        (slot / "codes_03.npy").write_bytes((slot / "codes_03.npy").read_bytes()[:-4])
        match = r"file codes_03\.npy has 604 bytes, expected 608; rebuilding it"
    elif damage == "garbage meta":
        (slot / "meta.json").write_text("{not json")
        match = r"has no readable meta\.json \(JSONDecodeError"
    elif damage == "other key":
        text = (slot / "meta.json").read_text()
        (slot / "meta.json").write_text(text.replace('"version": 1', '"version": 0'))
        match = r"built from other inputs \(version: 0 vs 1\)"
    elif damage == "no dict file":
        (slot / "dict_25.npy").unlink()
        match = r"file dict_25\.npy is missing"
    else:
        labels = np.load(slot / "labels.npy")
        np.save(slot / "labels.npy", labels.view(np.int32))
        match = r"file labels\.npy holds int32 \(120,\), expected float32 \(120,\)"
    with pytest.warns(UserWarning, match=match):
        got = _load(path)
    assert parses.calls == 2
    _same(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(path)  # the rebuilt slot is valid
    assert parses.calls == 2


def test_corrupt_ids_are_rebuilt_without_parsing(tmp_path: Path, counters) -> None:
    parses, encodes = counters
    path = _criteo_file(tmp_path / "train.txt")
    want = _in_memory(_load(path))  # truncating a mapped file would fault its readers
    ids = next((tmp_path / DEFAULT_CACHE_DIRNAME).glob("*.ids-*")) / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:200])
    with pytest.warns(UserWarning, match=r"file ids\.npy has 200 bytes, expected 25088"):
        got = _load(path)
    assert (parses.calls, encodes.calls) == (1, 2)
    _same(got, want)


def test_failed_parse_leaves_no_slot_and_dead_temporaries_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _criteo_file(tmp_path / "train.txt", bad_line=True)
    root = tmp_path / DEFAULT_CACHE_DIRNAME
    with pytest.raises(ValueError, match=r"train\.txt, line 8: malformed line: label"):
        _load(path, on_malformed="fail", block_size=256)
    assert os.listdir(root) == []

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a crash in the middle of writing the slot

    monkeypatch.setattr(cache_module.FileSink, "_store", crash)
    with pytest.raises(KeyboardInterrupt):
        _load(path, block_size=256)
    assert os.listdir(root) == []
    monkeypatch.undo()
    dead = root / "train.txt.criteo-0123456789abcdef.tmp-999999999-abcd1234"  # pid not running
    dead.mkdir()
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        _load(path)
    assert not any(".tmp-" in name for name in os.listdir(root))


def test_cached_malformed_lines_are_replayed(tmp_path: Path, counters) -> None:
    parses, _ = counters
    path = _criteo_file(tmp_path / "train.txt", bad_line=True)
    for _ in range(2):  # the parse, then the cache
        with pytest.warns(UserWarning, match=r"skipped 1 malformed line\(s\): line 8: label"):
            _load(path)
    with pytest.raises(ValueError, match=r"train\.txt, line 8: malformed line: label column"):
        _load(path, on_malformed="fail")
    assert parses.calls == 1


def test_cache_off_writes_nothing_and_cache_dir_moves_it(tmp_path: Path) -> None:
    path = _criteo_file(tmp_path / "data" / "train.txt") if (tmp_path / "data").mkdir() is None \
        else None
    train, _, _ = _load(path, cache=False)
    assert os.listdir(tmp_path / "data") == ["train.txt"] and not isinstance(train.dense, np.memmap)
    _load(path, cache_dir=tmp_path / "elsewhere")
    assert os.listdir(tmp_path / "data") == ["train.txt"]
    assert len(os.listdir(tmp_path / "elsewhere")) == 2


def test_unusable_cache_dir_falls_back_to_memory(tmp_path: Path) -> None:
    path = _criteo_file(tmp_path / "train.txt")
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match=r"cannot use the cache directory .*a_file.*reading "
                                         r".*train\.txt into memory"):
        got = _load(path, cache_dir=tmp_path / "a_file" / "cache")
    _same(got, _load(path, cache=False))


def test_memory_mapped_arrays_are_copy_on_write(tmp_path: Path) -> None:
    path = _criteo_file(tmp_path / "train.txt")
    train, _, _ = _load(path)
    before = train.sparse[0, 0]
    train.sparse[0, 0] = 12345
    train.dense[:] = 0.0
    again, _, _ = _load(path)
    assert again.sparse[0, 0] == before and again.dense.any()


def test_avazu_and_movielens_are_cached_too(tmp_path: Path, counters) -> None:
    parses, _ = counters
    avazu = tmp_path / "train.csv"
    avazu.write_text("id,click,hour,C1,site_id\n" + "".join(
        f"{i},{i % 2},141021{i % 24:02d},{i % 3},s{i % 5}\n" for i in range(50)))
    first = load_avazu(avazu, progress=False)
    assert load_avazu(avazu, progress=False)[2].sparse_names == first[2].sparse_names == (
        "hour", "C1", "site_id", "hour_of_day", "weekday")
    assert parses.calls == 1
    ratings, users = tmp_path / "ratings.dat", tmp_path / "users.dat"
    ratings.write_text("".join(f"{i % 7}::{i % 5}::{i % 6}::{1000 + i}\n" for i in range(60)))
    users.write_text("".join(f"{u}::F::1::10::4806{u}\n" for u in range(7)))
    first = load_movielens(ratings, users_path=users, progress=False)
    _same(first, load_movielens(ratings, users_path=users, progress=False))
    assert parses.calls == 3  # ratings and users parsed once each


def test_cached_arrays_make_torchrec_batches_through_the_registry(tmp_path: Path) -> None:
    from torchrec_fiited.data.registry import load_dataset

    path = _criteo_file(tmp_path / "train.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        for _ in range(2):  # parse, then cache
            train, test, spec = load_dataset("criteo", path=str(path), batch_size=32,
                                             progress=False, shuffle=True)
    assert sum(b.labels.numel() for b in train + test) == ROWS
    want, _, _ = _load(path, cache=False)
    first = train[0].sparse_features
    assert first.keys() == list(spec.sparse_names) and first.values().dtype == torch.int64
    assert int(first.values().max()) < max(spec.num_embeddings)
    assert sorted(np.concatenate([b.labels.numpy() for b in train]).tolist()) == \
        sorted(want.labels.tolist())


def test_slot_built_meanwhile_by_another_process_is_kept(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = _criteo_file(tmp_path / "train.txt", n=400)
    original = cache_module.read_blocks
    other: list = []

    def other_process_first(*args, **kwargs):
        if not other:  # another rank parses with other blocks and commits while we parse
            other.append(None)
            other.append(read_criteo_file(path, progress=False, block_size=100_000))
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "read_blocks", other_process_first)
    rows = read_criteo_file(path, progress=False, block_size=512)  # other block dictionaries
    labels, dense, hashes, _ = reference.read_lines(str(path), parse_criteo_line, 13, 26)
    np.testing.assert_array_equal(rows.hashes(), hashes)
    np.testing.assert_array_equal(rows.labels, labels)
    assert rows.sparse.dictionary_sizes == other[1].sparse.dictionary_sizes  # theirs, kept
    assert not any(".tmp-" in name for name in os.listdir(tmp_path / DEFAULT_CACHE_DIRNAME))
