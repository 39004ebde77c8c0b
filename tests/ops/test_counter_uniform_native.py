"""``fiited::counter_uniform_grid`` is bitwise ``store.layout.counter_uniform`` on a grid."""

import pytest
import torch

from torchrec_fiited.ops import dispatch, native
from torchrec_fiited.store.layout import (
    counter_state_int, counter_uniform, counter_uniform_from, table_key,
)

pytestmark = pytest.mark.skipif(
    "cpu" not in native.INIT_DEVICES, reason="native ops not built: run `make ext`"
)


@pytest.mark.parametrize("n,w", [(0, 4), (1, 1), (37, 8), (5000, 16), (3, 0)])
def test_grid_is_bitwise_the_reference(n, w):
    gen = torch.Generator().manual_seed(n * 31 + w)
    # Rows and columns across int64, including negatives and values above 2^32.
    rows = torch.randint(-(1 << 62), 1 << 62, (n,), generator=gen)
    cols = torch.randint(0, 1 << 40, (n, w), generator=gen)
    head, tail = [12345, table_key("t_cat_7")], [987654321]
    prefix = torch.full((n,), counter_state_int(head), dtype=torch.int64)
    got = torch.ops.fiited.counter_uniform_grid(prefix, rows, cols, tail)
    want = counter_uniform([*head, rows.unsqueeze(1), cols, *tail])
    assert got.dtype == torch.float32 and got.shape == (n, w)
    assert torch.equal(got, want)
    assert n * w == 0 or (float(got.min()) >= 0.0 and float(got.max()) < 1.0)


def test_dispatch_uses_the_reference_when_asked(monkeypatch):
    rows, cols = torch.arange(50), torch.arange(50 * 3).view(50, 3)
    # A different state per row (as for a pool's tables), against the reference per row.
    prefix = torch.tensor([counter_state_int([1, t % 3]) for t in range(50)])
    native_out = dispatch.counter_uniform_grid(prefix, rows, cols, [3])
    for i in (0, 1, 2, 49):
        assert torch.equal(native_out[i], counter_uniform([1, i % 3, rows[i], cols[i], 3]))
    monkeypatch.setenv(dispatch.NATIVE_ENV, "0")
    assert torch.equal(dispatch.counter_uniform_grid(prefix, rows, cols, [3]), native_out)


def test_bad_inputs_name_the_argument():
    with pytest.raises(RuntimeError, match=r"counter_uniform_grid: cols must be an int64 \(n=4"):
        torch.ops.fiited.counter_uniform_grid(torch.zeros(4).long(), torch.arange(4),
                                              torch.zeros(3, 2).long(), [])
    with pytest.raises(RuntimeError, match=r"rows must be a 1-D int64"):
        torch.ops.fiited.counter_uniform_grid(torch.zeros(4).long(), torch.arange(4).int(),
                                              torch.zeros(4, 2).long(), [])
    with pytest.raises(RuntimeError, match=r"prefix must be an int64 \(n=4\)"):
        torch.ops.fiited.counter_uniform_grid(torch.zeros(3).long(), torch.arange(4),
                                              torch.zeros(4, 2).long(), [])


def test_python_int_state_continues_the_generator():
    rest = [torch.arange(-5, 300) * 7919, 42]
    for keys in ([0], [12345, table_key("t")], [-1, 1 << 62, 7], [3, -(1 << 63)]):
        state = torch.tensor(counter_state_int(keys), dtype=torch.int64)
        assert torch.equal(counter_uniform_from(state, rest), counter_uniform([*keys, *rest]))
