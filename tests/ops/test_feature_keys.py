"""``fiited::feature_keys`` (a batch's ids -> store keys in one pass) against its reference."""

import pytest
import torch

from torchrec_fiited.ops import dispatch, native
from torchrec_fiited.store.layout import ROW_BITS, entry_key, hash_ids

pytestmark = pytest.mark.skipif(
    "cpu" not in native.KEYS_DEVICES, reason="native ops not built: run `make ext`"
)


def _features(gen, dtype):
    counts = [0, 700, 1, 5000, 33]  # a feature with no ids, one with one
    num_entries = [10, 1000, 7, 10**9, 1 << 40]
    top = (1 << 31) - 1  # ids representable as int32 too
    ids = torch.cat([torch.randint(0, min(e, top), (c,), generator=gen)
                     for c, e in zip(counts, num_entries)])
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    tidx = torch.tensor([0, 3, 5, 127, 64])
    return ids.to(dtype), starts, tidx << ROW_BITS, torch.tensor([0, 0, 100, 5, 0]), \
        torch.tensor(num_entries), tidx


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("hashed", [False, True])
def test_keys_match_the_reference_and_entry_key(dtype, hashed, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    ids, starts, base, offset, entries, tidx = _features(gen, dtype)
    if dtype == torch.int64 and hashed:
        ids[::7] = torch.randint(-(1 << 62), 1 << 62, (ids[::7].numel(),), generator=gen)
    got, bad = dispatch.feature_keys(ids, starts, base, offset, entries, hashed)
    assert bad == -1
    for f in range(len(starts) - 1):
        part = ids[starts[f] : starts[f + 1]].to(torch.int64)
        rows = hash_ids(part, int(entries[f])) if hashed else part
        want = entry_key(int(tidx[f]), rows + int(offset[f]))
        assert torch.equal(got[starts[f] : starts[f + 1]], want), f
    monkeypatch.setenv(dispatch.NATIVE_ENV, "0")
    ref, ref_bad = dispatch.feature_keys(ids, starts, base, offset, entries, hashed)
    assert torch.equal(got, ref) and ref_bad == -1


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_first_bad_id_is_found(native_on, monkeypatch):
    monkeypatch.setenv(dispatch.NATIVE_ENV, native_on)
    gen = torch.Generator().manual_seed(8)
    ids, starts, base, offset, entries, _ = _features(gen, torch.int64)
    ids[starts[3] + 4000] = 10**9  # == num_entries: outside
    ids[starts[3] + 4500] = -1
    _, bad = dispatch.feature_keys(ids, starts, base, offset, entries, False)
    assert bad == starts[3] + 4000
    _, bad = dispatch.feature_keys(ids, starts, base, offset, entries, True)
    assert bad == -1  # hashing takes any id


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match=r"feature_keys: id_starts must run from 0 to ids.numel\(\)=3"):
        torch.ops.fiited.feature_keys(torch.arange(3), torch.tensor([0, 2]), torch.zeros(1).long(),
                                      torch.zeros(1).long(), torch.tensor([5]), False)
    with pytest.raises(RuntimeError, match=r"num_entries must be an int64 \(1\) tensor"):
        torch.ops.fiited.feature_keys(torch.arange(3), torch.tensor([0, 3]), torch.zeros(1).long(),
                                      torch.zeros(1).long(), torch.tensor([5.0]), False)


@pytest.mark.parametrize("threads", [1, 2])
def test_expand_bags_matches_repeat_interleave(threads):
    """``fiited::expand_bags`` is ``repeat_interleave`` over offsets: empty bags (first, last, in
    runs), bags longer than a thread's share, and bad offsets refused."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 40, (5000,), generator=gen)
    lengths[:3] = 0
    lengths[-2:] = 0
    lengths[100:150] = 0
    lengths[2000] = 70000  # longer than a task's grain
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(-(1 << 40), 1 << 40, (5000,), generator=gen)
    n = int(offsets[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.fiited.expand_bags(values, offsets, n)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, torch.repeat_interleave(values, lengths, output_size=n))
    assert torch.equal(dispatch.expand_bags(values, offsets, n), got)
    empty = torch.ops.fiited.expand_bags(values[:0], offsets[:1], 0)
    assert empty.shape == (0,)
    with pytest.raises(RuntimeError, match=r"offsets must run from 0 to num_ids=5, got 0 to"):
        torch.ops.fiited.expand_bags(values, offsets, 5)
    bad = offsets.clone()
    bad[10] = bad[11] + 1
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing, got offsets\[10\]"):
        torch.ops.fiited.expand_bags(values, bad, n)


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_out_variants_write_what_the_functional_ops_return(native_on, monkeypatch):
    """``feature_keys`` and ``expand_bags`` into a caller's buffer (the training step's reused
    per-id tensors): the same values, in place, and a wrong buffer refused by name."""
    monkeypatch.setenv(dispatch.NATIVE_ENV, native_on)
    gen = torch.Generator().manual_seed(9)
    ids, starts, base, offset, entries, _ = _features(gen, torch.int64)
    want, _ = dispatch.feature_keys(ids, starts, base, offset, entries, True)
    out = torch.full((ids.numel(),), -3, dtype=torch.int64)
    got, bad = dispatch.feature_keys(ids, starts, base, offset, entries, True, out=out)
    assert bad == -1 and got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    ids[5] = 10**12  # outside feature 1 (rows 1000): found through the out variant too
    _, bad = dispatch.feature_keys(ids, starts, base, offset, entries, False, out=out)
    assert bad == 5

    offsets = torch.tensor([0, 0, 3, 3, 7])
    values = torch.tensor([4, 5, 6, 7])
    buf = torch.empty(7, dtype=torch.int64)
    assert dispatch.expand_bags(values, offsets, 7, out=buf).data_ptr() == buf.data_ptr()
    assert buf.tolist() == [5, 5, 5, 7, 7, 7, 7]
    if native_on == "1":
        with pytest.raises(RuntimeError, match=r"feature_keys: keys must be a contiguous int64"):
            torch.ops.fiited.feature_keys_out(ids, torch.tensor(starts), base, offset, entries,
                                              True, torch.empty(3, dtype=torch.int64))
        with pytest.raises(RuntimeError, match=r"expand_bags: out must be a contiguous int64"):
            torch.ops.fiited.expand_bags_out(values, offsets, torch.empty(7, dtype=torch.int32))
        with pytest.raises(RuntimeError, match=r"offsets must run from 0 to num_ids=6"):
            torch.ops.fiited.expand_bags_out(values, offsets, torch.empty(6, dtype=torch.int64))


@pytest.mark.parametrize("native_on", ["1", "0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_positions_match_nonzero(native_on, threads, monkeypatch):
    """``positions_equal`` / ``positions_in`` (admission's misses and displaced hits) are
    ``nonzero`` of the mask they skip: ascending, across task boundaries, none or all found;
    a value outside the mask is refused by position."""
    monkeypatch.setenv(dispatch.NATIVE_ENV, native_on)
    gen = torch.Generator().manual_seed(5)
    values = torch.randint(0, 50, (200_000,), generator=gen)  # several tasks of 32k ids
    mask = torch.rand(50, generator=gen) < 0.3
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(dispatch.positions_equal(values, 7), (values == 7).nonzero().squeeze(1))
        assert dispatch.positions_equal(values, 50).numel() == 0
        assert torch.equal(dispatch.positions_equal(values[:0], 3), torch.zeros(0, dtype=torch.int64))
        assert torch.equal(dispatch.positions_in(values, mask), mask[values].nonzero().squeeze(1))
        assert torch.equal(dispatch.positions_in(values, torch.ones(50, dtype=torch.bool)),
                           torch.arange(values.numel()))
    finally:
        torch.set_num_threads(before)
    if native_on == "1":
        bad = values.clone()
        bad[70_000] = 50
        bad[90_000] = -1
        with pytest.raises(RuntimeError, match=r"positions_in: values\[70000\]=50 is outside"):
            torch.ops.fiited.positions_in(bad, mask)
        with pytest.raises(RuntimeError, match=r"mask must be a 1-D bool"):
            torch.ops.fiited.positions_in(values, mask.to(torch.uint8))
