"""``row_permutation``: the bijection whose blocks are the row-wise shards' hash ranges."""

import pytest
import torch

from torchrec_fiited.store import row_permutation


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4096, 65_537])
def test_a_bijection_of_the_rows_and_its_inverse(n):
    rows = torch.arange(n)
    permuted = row_permutation(rows, n)
    assert torch.equal(torch.sort(permuted).values, rows)
    assert torch.equal(row_permutation(permuted, n, inverse=True), rows)
    if n > 16:
        assert not torch.equal(permuted, rows)


def test_large_id_spaces_round_trip_without_a_dense_pass():
    n = 10**9 + 7  # odd bit count: the Feistel halves cover 2^30 x 2^30 and walk back in range
    ids = torch.randint(0, n, (50_000,), generator=torch.Generator().manual_seed(1))
    permuted = row_permutation(ids, n)
    assert bool(((permuted >= 0) & (permuted < n)).all())
    assert torch.equal(row_permutation(permuted, n, inverse=True), ids)


def test_fixed_across_processes_and_versions():
    # Checkpoints validate a row-wise shard's rows by their hash range: the map must not change.
    got = row_permutation(torch.arange(6), 1_000_000).tolist()
    assert got == row_permutation(torch.arange(6), 1_000_000).tolist()
    assert got == [121652, 2660, 402110, 841717, 518425, 513407]


def test_consecutive_ids_spread_over_every_block():
    n, ranks = 1_000_000, 4
    blocks = row_permutation(torch.arange(10_000), n) // (n // ranks)
    counts = torch.bincount(blocks, minlength=ranks)
    assert int(counts.min()) > 2300 and int(counts.max()) < 2700


def test_refuses_an_empty_id_space():
    with pytest.raises(ValueError, match="num_rows >= 1"):
        row_permutation(torch.arange(3), 0)


@pytest.mark.parametrize("inverse", [False, True])
def test_the_native_op_is_the_reference_bit_for_bit(inverse):
    from torchrec_fiited.ops import dispatch, native, reference

    if "cpu" not in native.KEYS_DEVICES:
        pytest.skip("native ops not built")
    g = torch.Generator().manual_seed(3)
    sizes = [1, 7, 100_000, 10**9 + 7, 4096]
    counts = [3, 50, 20_000, 5_000, 0]
    rows = torch.cat([torch.randint(0, n, (c,), generator=g) for n, c in zip(sizes, counts)])
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    shift = [0, 2, 0, 11, 0] if inverse else [0] * 5
    shifted = rows - torch.repeat_interleave(torch.tensor(shift), torch.tensor(counts))
    got = dispatch.row_permutation(shifted, starts, sizes, shift, inverse)
    want = reference.row_permutation(shifted, starts, sizes, shift, inverse)
    assert torch.equal(got, want)
    assert torch.equal(got[3:53], row_permutation(rows[3:53], 7, inverse))
    with pytest.raises(RuntimeError, match=r"row 7 at position 0 is outside \[0, num_rows\)"):
        torch.ops.fiited.row_permutation(torch.tensor([7]), torch.tensor([0, 1]),
                                         torch.tensor([7]), torch.tensor([0]), inverse)
