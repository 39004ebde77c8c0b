"""Tests of the block reader: crc32 of pyarrow arrays, line counting, blocks, fast vs slow path."""

import gzip
import io
import random
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from torchrec_fiited.data.blocks import (
    MAX_TABLE_TOKEN,
    ByteBlocks,
    binary_column,
    count_lines,
    crc32_binary,
    parse_block,
    parse_block_lines,
)
from torchrec_fiited.data.common import MISSING_HASH, hash_token
from torchrec_fiited.data.criteo import CriteoFormat


@pytest.mark.parametrize("lengths", [(8,), (0, 8), (0,), (1, 2, 3, 7, 9, 16, MAX_TABLE_TOKEN + 5)])
def test_crc32_binary_equals_zlib(lengths: tuple[int, ...]) -> None:
    rng = random.Random(sum(lengths))
    values = [bytes(rng.randrange(256) for _ in range(rng.choice(lengths))) for _ in range(400)]
    want = [zlib.crc32(v) if v else MISSING_HASH for v in values]
    array = pa.array(values, pa.binary())
    assert crc32_binary(array).tolist() == want
    assert crc32_binary(array.slice(37, 200)).tolist() == want[37:237]  # offset into buffers


def test_crc32_binary_equals_hash_token_of_text() -> None:
    # hex, UTF-8, an undecodable byte kept by surrogateescape
    tokens = ["68fd1e64", "é", "a\udcff"]
    array = pa.array([t.encode("utf-8", "surrogateescape") for t in tokens], pa.binary())
    assert crc32_binary(array).tolist() == [hash_token(t) for t in tokens]


@pytest.mark.parametrize("text", ["a\nb\n", "a\r\nb\r\n", "a\rb\r\n\rc", "\n\n", "x", "a\r"])
def test_count_lines_counts_universal_newlines(text: str) -> None:
    lines = list(io.StringIO(text, newline=""))
    ended = sum(1 for line in lines if line.endswith(("\n", "\r")))
    assert count_lines(text.encode()) == ended


def test_byte_blocks_cut_after_newlines_and_read_gzip_and_header(tmp_path: Path) -> None:
    text = b"h1,h2\r\n" + b"".join(b"%d,%s\n" % (i, b"x" * (i % 13)) for i in range(300)) + b"end"
    for name, data in (("plain.csv", text), ("packed.csv.gz", gzip.compress(text))):
        path = tmp_path / name
        path.write_bytes(data)
        with ByteBlocks(str(path), block_size=50, progress=False) as blocks:
            assert blocks.header() == "h1,h2" and blocks.first_lineno == 2
            parts = list(blocks)
        assert b"".join(parts) == text[7:]
        assert all(p.endswith(b"\n") for p in parts[:-1]) and parts[-1].endswith(b"end")


def test_byte_blocks_header_ending_in_lone_cr(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(b"a,b\rc,d\n")
    with ByteBlocks(str(path), block_size=2, progress=False) as blocks:
        assert blocks.header() == "a,b"
        assert b"".join(blocks) == b"c,d\n"


def test_byte_blocks_reject_missing_empty_and_bad_block_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope"):
        ByteBlocks(str(tmp_path / "nope"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data file is empty: .*empty"):
        ByteBlocks(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        ByteBlocks(str(tmp_path / "empty"), block_size=0)


def _criteo(dense: str = "1", label: str = "1", cat: str = "68fd1e64") -> str:
    return "\t".join([label] + [dense] * 13 + [cat] * 26)


@pytest.mark.parametrize("dense, valid", [
    ("+5", True),      # pyarrow rejects, int() accepts: slow path keeps the row
    ("1_000", True),   # same
    ("0x10", False),   # pyarrow accepts (16), int() rejects: forced to the slow path
    (" 7", True),      # both accept
    ("99999999999999999999", True),  # beyond int64: slow path, float(int(...))
])
def test_fast_and_slow_paths_agree_on_odd_integers(dense: str, valid: bool) -> None:
    raw = ("\n".join([_criteo(), _criteo(dense), _criteo()]) + "\n").encode()
    fast = parse_block(CriteoFormat(), raw)
    slow_rows, slow_bad = parse_block_lines(CriteoFormat(), raw)
    assert len(fast.rows) == len(slow_rows) == (3 if valid else 2)
    assert [b.lineno for b in fast.bad] == [b.lineno for b in slow_bad] == ([] if valid else [2])
    np.testing.assert_array_equal(fast.rows.dense, slow_rows.dense)
    for f in range(26):
        np.testing.assert_array_equal(fast.rows.sparse[f].hashes(), slow_rows.sparse[f].hashes())


def test_byte_order_mark_is_part_of_the_first_label() -> None:
    raw = b"\xef\xbb\xbf" + (_criteo() + "\n" + _criteo() + "\n").encode()
    block = parse_block(CriteoFormat(), raw)
    assert len(block.rows) == 1 and block.bad[0].lineno == 1 and "'\\ufeff1'" in block.bad[0].reason


def test_block_reports_bad_lines_with_rows_before_them() -> None:
    lines = [_criteo(), _criteo(label="2"), "", _criteo(), _criteo(cat="x")[:-1]]
    block = parse_block(CriteoFormat(), ("\r\n".join(lines) + "\r\n").encode())
    assert block.num_lines == 5 and len(block.rows) == 3  # the last line ends in an empty field
    assert [(b.lineno, b.rows_before) for b in block.bad] == [(2, 1)]
    assert block.rows.sparse[25].hashes()[-1] == MISSING_HASH


@pytest.mark.parametrize("tokens", [
    [b"68fd1e64", b"", b"68fd1e64", b"0000000a"],        # 8 bytes: packed keys, encoded
    [b"%08x" % i for i in range(3000)],                   # all distinct: one entry per row
    [b"1005", b"", b"1002", b"1005"],                     # 4 bytes: padded keys
    [b"\0" * 8, b"", b"abcdefgh"],                        # all-zero bytes: not packable
    [b"15706", b"-1", b"", b"79", b"15706"],              # mixed widths: string encoding
    [b"", b""],                                           # all missing
])
def test_binary_column_hashes_every_value(tokens: list[bytes]) -> None:
    col = binary_column(pa.chunked_array([pa.array(tokens[:2], pa.binary()),
                                          pa.array(tokens[2:], pa.binary())]))
    assert col.hashes().tolist() == [zlib.crc32(t) if t else MISSING_HASH for t in tokens]
    assert np.unique(col.codes).size == col.dictionary.size  # every entry used
