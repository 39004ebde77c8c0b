"""Acceptance 5 and checkpoint safety: bitwise resume, strict and atomic loading."""

import io

import pytest
import torch

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

CFG = FiitedConfig(num_chunks=2, budget=0.3, prune_interval=3, sample_size=16, decay=0.9,
                   enforce_ratio=0.0, optimizer="rowwise_adagrad", learning_rate=0.05, seed=7)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [random_kjt(make_tables(), batch_size=6, gen=gen, max_len=5) for _ in range(n)]


def _step(m, kjt):
    out = m(kjt).values()
    out.pow(2).sum().backward()
    return out.detach()


def _roundtrip(m):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_is_bitwise_identical():
    batches = _batches(14)
    straight = FiitedEmbeddingBagCollection(make_tables(), CFG)
    expected = [_step(straight, b) for b in batches]

    first = FiitedEmbeddingBagCollection(make_tables(), CFG)
    for b in batches[:7]:  # crosses two pruning cycles (steps 3 and 6)
        _step(first, b)
    assert first.stats()["pools"]["shared_cs4"]["last_cycle"]["step"] == 6
    resumed = FiitedEmbeddingBagCollection(make_tables(), CFG)
    resumed.load_state_dict(_roundtrip(first))
    got = [_step(resumed, b) for b in batches[7:]]
    for a, b in zip(got, expected[7:]):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka


def _trained():
    m = FiitedEmbeddingBagCollection(make_tables(), CFG)
    for b in _batches(4):
        _step(m, b)
    return m


def _assert_unchanged(m, before):
    for k, v in m.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_state_dict_from_another_config_is_rejected_and_state_unchanged():
    m = FiitedEmbeddingBagCollection(make_tables(), CFG)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    other = FiitedEmbeddingBagCollection(
        make_tables(), FiitedConfig(**{**CFG.to_dict(), "decay": 0.5}))
    with pytest.raises(ValueError, match="another FiitedConfig.*decay: 0.5 vs 0.9"):
        m.load_state_dict(other.state_dict())
    _assert_unchanged(m, before)


def test_state_dict_with_other_tables_is_rejected():
    m = FiitedEmbeddingBagCollection(make_tables(), CFG)
    other = FiitedEmbeddingBagCollection(make_tables(rows=44), CFG)
    with pytest.raises(ValueError, match="missing keys|expected|tables differ"):
        m.load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd["store.tables.t0.chunk_slots"].__setitem__((0, 0), 10**6), "outside"),
        (lambda sd: sd["store.pools.shared_cs4.num_free"].fill_(-3), "num_free"),
        (lambda sd: sd["store.tables.t0.live_mask"].__setitem__(slice(None), 0), "live_mask"),
        (lambda sd: sd.pop("store.tables.t1.utilities"), "missing keys"),
        (lambda sd: sd.__setitem__("store.tables.t1.utilities", torch.zeros(3)), "expected"),
        (lambda sd: sd.__setitem__("_extra_state", {"bogus": 1}), "_extra_state"),
    ],
)
def test_corrupt_checkpoint_is_rejected_and_state_unchanged(corrupt, message):
    src = _trained()
    sd = _roundtrip(src)
    corrupt(sd)
    m = _trained()
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        m.load_state_dict(sd)
    _assert_unchanged(m, before)


def test_duplicate_slot_is_detected():
    sd = _roundtrip(_trained())
    slots = sd["store.tables.t0.chunk_slots"]
    live = (slots >= 0).nonzero()
    a, b = live[0], live[1]
    slots[b[0], b[1]] = slots[a[0], a[1]]
    with pytest.raises(ValueError, match="exactly once"):
        _trained().load_state_dict(sd)
