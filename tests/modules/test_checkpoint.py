"""Acceptance 5 and checkpoint safety: bitwise resume, strict and atomic loading.

Store v2: the state dict is budget-sized (per pool a hash table of resident keys and their
entries' chunk slots, utilities and last steps, a utility sketch; no tensor per row of the id
space). A corrupt one is rejected with the store's invariant error before anything is copied.
"""

import io

import pytest
import torch

from tests.conftest import make_tables, module_bytes, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.ops.hash_reference import EMPTY_KEY, bucket_of
from torchrec_fiited.store import entry_key

ROWS = 400  # make_tables(rows=ROWS): t0 and t2 share pool shared_cs4, t1 has shared_cs8
CFG = FiitedConfig(num_chunks=2, budget=0.3, prune_interval=3, sample_size=16, decay=0.9,
                   enforce_ratio=0.0, optimizer="rowwise_adagrad", learning_rate=0.05, seed=7)
E4 = "store.entries.shared_cs4."


def _tables():
    return make_tables(rows=ROWS)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [random_kjt(_tables(), batch_size=16, gen=gen, max_len=5) for _ in range(n)]


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
    straight = FiitedEmbeddingBagCollection(_tables(), CFG)
    expected = [_step(straight, b) for b in batches]

    first = FiitedEmbeddingBagCollection(_tables(), CFG)
    for b in batches[:7]:  # crosses two pruning cycles (steps 3 and 6)
        _step(first, b)
    stats = first.stats()
    assert stats["pools"]["shared_cs4"]["last_cycle"]["step"] == 6
    # The checkpoint carries every kind of v2 state: a (nearly) full hash table that erased
    # entries at the cycles (their utility went to the sketch) and admitted new ones since.
    pool = stats["pools"]["shared_cs4"]
    assert pool["resident_entries"] >= 0.9 * pool["entry_capacity"]
    assert sum(t["erased_last_cycle"] for t in stats["tables"].values()) > 0
    assert bool((first.store.sketches["shared_cs4"].counts > 0).any())
    resumed = FiitedEmbeddingBagCollection(_tables(), CFG)
    resumed.load_state_dict(_roundtrip(first))
    assert resumed.store.invariant_errors() == []
    got = [_step(resumed, b) for b in batches[7:]]
    for a, b in zip(got, expected[7:]):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka
    assert resumed.stats()["pools"] == straight.stats()["pools"]


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.3])
def test_state_dict_is_budget_sized(budget):
    """Every tensor of the state dict is counted by stats() and the total is within the budget:
    nothing is sized by num_embeddings (store v2). At budget 0.01 that is 0.36 B per row of the
    id space, less than any per-row tensor would take."""
    cfg = FiitedConfig(**{**CFG.to_dict(), "budget": budget})
    m = FiitedEmbeddingBagCollection(make_tables(rows=20_000), cfg)
    sd = m.state_dict()
    tensors = [v for v in sd.values() if isinstance(v, torch.Tensor)]
    sd_bytes = sum(t.numel() * t.element_size() for t in tensors)
    stats = m.stats()
    assert sd_bytes == stats["bytes"]["total"] == module_bytes(m)
    assert sd_bytes <= budget * stats["bytes_full"]


def _trained(seed=0):
    m = FiitedEmbeddingBagCollection(_tables(), CFG)
    for b in _batches(4, seed):
        _step(m, b)
    return m


def _snapshot(m):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
        else:
            assert v == before[k], k


def test_state_dict_from_another_config_is_rejected_and_state_unchanged():
    m = _trained(seed=1)
    before = _snapshot(m)
    other = FiitedEmbeddingBagCollection(_tables(), FiitedConfig(**{**CFG.to_dict(), "decay": 0.5}))
    with pytest.raises(ValueError, match="another FiitedConfig.*decay: 0.5 vs 0.9"):
        m.load_state_dict(other.state_dict())
    _assert_unchanged(m, before)
    bigger = FiitedEmbeddingBagCollection(_tables(), FiitedConfig(**{**CFG.to_dict(), "bucket_size": 8}))
    with pytest.raises(ValueError, match="another FiitedConfig.*bucket_size: 8 vs 32"):
        m.load_state_dict(bigger.state_dict())
    _assert_unchanged(m, before)


def test_state_dict_with_other_tables_is_rejected():
    m = FiitedEmbeddingBagCollection(_tables(), CFG)
    other = FiitedEmbeddingBagCollection(make_tables(rows=ROWS + 4), CFG)
    with pytest.raises(ValueError, match="missing keys|expected|tables differ"):
        m.load_state_dict(other.state_dict())


# ---- corruptions of the v2 fields -----------------------------------------------------------------


def _resident(sd, prefix=E4):
    """Slots int64 [n] of the resident keys of a pool's hash table."""
    return (sd[prefix + "index.keys"] != EMPTY_KEY).nonzero().squeeze(1)


def _num_buckets(sd, prefix=E4, W=32):
    return sd[prefix + "index.keys"].numel() // W


def _two_in(sd, same_bucket: bool):
    """Two resident slots in one bucket, or in two different buckets."""
    slots = _resident(sd)
    buckets = slots // 32
    a = slots[0]
    pick = (buckets == buckets[0]) if same_bucket else (buckets != buckets[0])
    pick[0] = False
    return int(a), int(slots[pick][0])


def _duplicate_key(sd):
    a, b = _two_in(sd, same_bucket=True)
    sd[E4 + "index.keys"][b] = sd[E4 + "index.keys"][a]


def _swap_buckets(sd):
    a, b = _two_in(sd, same_bucket=False)
    keys = sd[E4 + "index.keys"]
    keys[a], keys[b] = keys[b].clone(), keys[a].clone()


def _foreign_table_key(sd):
    """A resident key of shared_cs4 replaced by a key of t1 (table index 1, pool shared_cs8)
    that hashes to the same bucket: in its bucket, unique, but not of this pool's tables."""
    slot = int(_resident(sd)[0])
    nb = _num_buckets(sd)
    keys = entry_key(1, torch.arange(ROWS // 2))
    home = bucket_of(keys, nb)
    sd[E4 + "index.keys"][slot] = keys[home == slot // 32][0]


def _live_chunk(sd, prefix=E4):
    """(entry, chunk) of a live chunk."""
    live = (sd[prefix + "chunk_slots"][:-1] >= 0).nonzero()
    return int(live[0, 0]), int(live[0, 1])


def _slot_twice(sd):
    cs = sd[E4 + "chunk_slots"]
    live = (cs[:-1] >= 0).nonzero()
    (a0, a1), (b0, b1) = live[0].tolist(), live[1].tolist()
    cs[b0, b1] = cs[a0, a1]


def _free_slot_also_live(sd):
    """A live chunk's slot pushed on the free stack too."""
    e, k = _live_chunk(sd, "store.entries.shared_cs8.")
    top = int(sd["store.pools.shared_cs8.num_free"])
    sd["store.pools.shared_cs8.free_stack"][top] = sd["store.entries.shared_cs8.chunk_slots"][e, k]
    sd["store.pools.shared_cs8.num_free"].add_(1)


def _null_holds_slot(sd):
    e, k = _live_chunk(sd)
    sd[E4 + "chunk_slots"][-1, k] = sd[E4 + "chunk_slots"][e, k]
    sd[E4 + "chunk_slots"][e, k] = -1  # the slot is referenced once, by the null entry


def _null_scored(sd):
    sd[E4 + "utilities"][-1] = 2.0


def _free_entry_with_utilities(sd):
    """An entry whose key is gone (and counted so), holding no chunk but still its utilities."""
    resident = sd[E4 + "index.keys"] != EMPTY_KEY
    chunkless = resident & (sd[E4 + "chunk_slots"][:-1] < 0).all(1)
    slot = int(chunkless.nonzero()[0, 0])
    assert bool((sd[E4 + "utilities"][slot] > 0).any())
    sd[E4 + "index.keys"][slot] = EMPTY_KEY
    sd[E4 + "num_seen"] -= 1


def _free_entry_with_chunks(sd):
    """An entry whose key is gone (and counted so) but which still holds its chunks."""
    slot = int(_resident(sd)[0])
    sd[E4 + "index.keys"][slot] = EMPTY_KEY
    sd[E4 + "num_seen"] -= 1


def _nan_at_resident(field):
    def corrupt(sd):
        sd[E4 + field][int(_resident(sd)[0])] = float("nan")
    return corrupt


CORRUPTIONS = [
    (lambda sd: sd[E4 + "chunk_slots"].__setitem__(_live_chunk(sd), 30_000), "chunk_slots outside"),
    (lambda sd: sd["store.pools.shared_cs4.num_free"].fill_(-3), "num_free=-3"),
    (_duplicate_key, "a key is resident twice"),
    (_swap_buckets, "a key sits outside its hash bucket"),
    (_foreign_table_key, "a key names a table outside the pool"),
    (_slot_twice, "exactly once"),
    (_free_slot_also_live, "exactly once"),
    (_null_holds_slot, "the null entry holds state"),
    (_null_scored, "the null entry holds state"),
    (_free_entry_with_utilities, "a free entry holds utilities"),
    (_free_entry_with_chunks, "a free entry holds live chunks"),
    (lambda sd: sd[E4 + "num_seen"].add_(1), "num_seen="),
    (lambda sd: sd["store.pools.shared_cs4.live_per_chunk"].add_(1), "live_per_chunk disagrees"),
    (_nan_at_resident("utilities"), "utilities must be finite"),
    (lambda sd: sd[E4 + "utilities"].__setitem__(_live_chunk(sd), -1.0), "utilities must be finite and >= 0"),
    (_nan_at_resident("index.scores"), "index.scores.*NaN"),
    (lambda sd: sd["store.sketches.shared_cs4.counts"].view(-1)[0].fill_(float("nan")), "sketches.*finite"),
    (lambda sd: sd["store.sketches.shared_cs4.counts"].view(-1)[0].fill_(-1.0), "sketches.*>= 0"),
    (lambda sd: sd["steps_done"].fill_(-1), "steps_done=-1"),
    (lambda sd: sd.pop(E4 + "utilities"), "missing keys"),
    (lambda sd: sd.__setitem__(E4 + "utilities", torch.zeros(3)), "expected"),
    (lambda sd: sd.__setitem__(E4 + "index.keys", sd[E4 + "index.keys"][:-32].clone()),
     r"index.keys.*expected \(\d+,\) torch.int64, got \(\(\d+,\)"),
    (lambda sd: sd.__setitem__("store.sketches.shared_cs4.counts", torch.zeros(2, 5, 2)), "sketches.*expected"),
    (lambda sd: sd.__setitem__("_extra_state", {"bogus": 1}), "_extra_state"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[m for _, m in CORRUPTIONS])
def test_corrupt_checkpoint_is_rejected_and_state_unchanged(corrupt, message):
    sd = _roundtrip(_trained())
    corrupt(sd)
    # Trained on other batches, so a load that copied some tensors before failing would show.
    m = _trained(seed=1)
    before = _snapshot(m)
    assert any(not torch.equal(v, sd[k]) for k, v in before.items()
               if isinstance(v, torch.Tensor) and k in sd and v.shape == sd[k].shape)
    with pytest.raises(ValueError, match=message):
        m.load_state_dict(sd)
    _assert_unchanged(m, before)
    # Still a working module.
    assert m.store.invariant_errors() == []
    _step(m, _batches(1, seed=2)[0])


def test_uncorrupted_roundtrip_loads_into_another_trained_module():
    """The control for the corruptions above: the same source, uncorrupted, loads."""
    src = _trained()
    m = _trained(seed=1)
    m.load_state_dict(_roundtrip(src))
    for k, v in src.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(m.state_dict()[k], v), k
