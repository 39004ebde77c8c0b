"""ResidentHashTable against a pure-Python model of its documented rule, and native vs reference.

The model (``Model``) keeps the same slot layout with its own splitmix64 in Python integers and
applies ``ops/hash_reference.py``'s insert rule one key at a time; the property test compares
every slot after every batch, for the reference ops and (when built) the native ones.
"""

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_fiited.ops import dispatch, native
from torchrec_fiited.ops.hash_reference import EMPTY_KEY
from torchrec_fiited.store.hash_table import InsertResult, ResidentHashTable

IMPLS = ["reference", "native"]
NATIVE_SKIP = pytest.mark.skipif(
    "cpu" not in native.HASH_DEVICES,
    reason="native hash-table ops not built: run `make ext`")
M64 = (1 << 64) - 1


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Runs the test with the reference ops, then with the native ones (when built)."""
    if request.param == "native" and "cpu" not in native.HASH_DEVICES:
        pytest.skip("native hash-table ops not built: run `make ext`")
    monkeypatch.setenv(dispatch.NATIVE_ENV, "1" if request.param == "native" else "0")
    return request.param


def py_bucket(key: int, num_buckets: int) -> int:
    """splitmix64's finalizer in Python integers, then the multiply-shift range reduction."""
    z = key & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return ((z >> 32) * num_buckets) >> 32


class Model:
    """The documented rule, one key at a time, on Python lists."""

    def __init__(self, num_buckets: int, W: int) -> None:
        self.nb, self.W = num_buckets, W
        self.keys: List[Optional[int]] = [None] * (num_buckets * W)
        self.scores: List[float] = [0.0] * (num_buckets * W)

    def _bucket_slots(self, key: int) -> range:
        b = py_bucket(key, self.nb)
        return range(b * self.W, (b + 1) * self.W)

    def find(self, key: int) -> int:
        return next((i for i in self._bucket_slots(key) if self.keys[i] == key), -1)

    def insert(self, keys: List[int],
               scores: List[float]) -> Tuple[List[int], List[int], List[int]]:
        best: Dict[int, float] = {}
        for k, s in zip(keys, scores):
            best[k] = max(best.get(k, float("-inf")), s)
        slot = {k: self.find(k) for k in best}
        taken = {i for i in slot.values() if i >= 0}  # pinned, then also the newly inserted
        missing = sorted((k for k in best if slot[k] < 0),
                         key=lambda k: (py_bucket(k, self.nb), -best[k], k))
        evicted = []
        for k in missing:
            rng = self._bucket_slots(k)
            free = [i for i in rng if self.keys[i] is None]
            if free:
                i = free[0]
            else:
                victims = [i for i in rng if i not in taken]
                i = min(victims, key=lambda i: (self.scores[i], i)) if victims else -1
                if i < 0 or not best[k] > self.scores[i]:
                    continue
                evicted.append((i, self.keys[i]))
            self.keys[i], self.scores[i] = k, best[k]
            taken.add(i)
            slot[k] = i
        evicted.sort()
        return [slot[k] for k in keys], [k for _, k in evicted], [i for i, _ in evicted]

    def erase(self, keys: List[int]) -> int:
        n = 0
        for k in set(keys):
            i = self.find(k)
            if i >= 0:
                self.keys[i], self.scores[i], n = None, 0.0, n + 1
        return n

    def key_tensor(self) -> torch.Tensor:
        return torch.tensor([EMPTY_KEY if k is None else k for k in self.keys], dtype=torch.int64)


def check_invariants(table: ResidentHashTable) -> None:
    keys, slots = table.resident_keys()
    assert torch.unique(keys).numel() == keys.numel(), "a key is resident twice"
    home = torch.tensor([py_bucket(int(k), table.num_buckets) for k in keys], dtype=torch.int64)
    assert torch.equal(home, slots // table.bucket_size), "a key is outside its bucket"


# Few distinct keys (duplicates, collisions) plus extremes of int64; few scores (ties, -0.0).
KEYS = st.one_of(st.integers(-12, 40), st.sampled_from([2**63 - 1, -(2**63) + 1, 2**40]))
SCORES = st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, 3.25, float("inf")])
BATCH = st.lists(st.tuples(KEYS, SCORES), max_size=40)
OPS = st.lists(st.tuples(st.sampled_from(["insert", "insert", "lookup", "erase"]), BATCH),
               min_size=1, max_size=12)


# NOTE: `impl` only sets the implementation's environment switch, the same for every example.
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_buckets=st.sampled_from([1, 2, 3]), W=st.sampled_from([8, 16]), ops=OPS)
def test_matches_model(impl, num_buckets, W, ops):
    table, model = ResidentHashTable(num_buckets, W), Model(num_buckets, W)
    for op, batch in ops:
        keys = torch.tensor([k for k, _ in batch], dtype=torch.int64)
        scores = torch.tensor([s for _, s in batch], dtype=torch.float32)
        if op == "insert":
            got = table.insert(keys, scores)
            want = model.insert(keys.tolist(), scores.tolist())
            assert got.slots.tolist() == want[0]
            assert got.evicted_keys.tolist() == want[1]
            assert got.evicted_slots.tolist() == want[2]
        elif op == "erase":
            assert table.erase(keys) == model.erase(keys.tolist())
        else:
            assert table.lookup(keys).tolist() == [model.find(k) for k in keys.tolist()]
        assert torch.equal(table.keys, model.key_tensor())
        resident = table.keys != EMPTY_KEY
        assert table.scores[resident].tolist() == [
            s for k, s in zip(model.keys, model.scores) if k is not None]
        check_invariants(table)


def test_full_bucket_rule(impl):
    """One bucket of 8: fill it, then a lower score is refused and a higher one evicts the min."""
    table = ResidentHashTable(1, 8)
    table.insert(torch.arange(8), torch.arange(8, dtype=torch.float32))
    # Placed in (score desc, key asc) order: key 7 takes slot 0, ..., key 0 slot 7.
    assert table.lookup(torch.arange(8)).tolist() == list(range(7, -1, -1))
    r = table.insert(torch.tensor([100, 101]), torch.tensor([0.0, 5.5]))
    assert r.slots.tolist() == [-1, 7]  # 0.0 is not > 0.0 (key 0's score); 5.5 evicts key 0
    assert r.evicted_keys.tolist() == [0] and r.evicted_slots.tolist() == [7]
    # Residents of the batch are pinned: key 1 (score 1, the min) is not evicted by key 200.
    r = table.insert(torch.tensor([1, 200]), torch.tensor([0.0, 9.0]))
    assert r.slots.tolist() == [6, 5] and r.evicted_keys.tolist() == [2]
    assert table.erase(torch.tensor([1, 1, 999])) == 1
    assert table.insert(torch.tensor([300]), torch.tensor([-5.0])).slots.tolist() == [6]


def random_batch(n: int, gen: torch.Generator, id_space: int = 1 << 22):
    """Zipf-like ids (many repeats) spread over int64, and random scores with ties."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    ids = (id_space * u.pow(3)).long() * 0x9E3779B97F4A7C15 % (1 << 62) - (1 << 61)
    scores = torch.randint(0, 64, (n,), generator=gen).float() / 8
    return ids, scores


@NATIVE_SKIP
def test_native_matches_reference(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    tables = {impl: ResidentHashTable(1000, 16) for impl in IMPLS}
    for _ in range(6):
        keys, scores = random_batch(20000, gen)
        results = {}
        for impl, table in tables.items():
            monkeypatch.setenv(dispatch.NATIVE_ENV, "1" if impl == "native" else "0")
            results[impl] = (table.insert(keys, scores), table.lookup(keys),
                             table.erase(keys[:500]))
        ref, nat = results["reference"], results["native"]
        for a, b in zip(ref[0], nat[0]):
            assert torch.equal(a, b)
        assert torch.equal(ref[1], nat[1]) and ref[2] == nat[2]
        assert torch.equal(tables["reference"].keys, tables["native"].keys)
        assert torch.equal(tables["reference"].scores, tables["native"].scores)


def test_deterministic_across_threads(impl):
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            gen = torch.Generator().manual_seed(1)
            table = ResidentHashTable(512, 32)
            results = [table.insert(*random_batch(65536, gen)) for _ in range(3)]
            out.append((table.keys.clone(), table.scores.clone(), results))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    for r1, r2 in zip(out[0][2], out[1][2]):
        assert all(torch.equal(a, b) for a, b in zip(r1, r2))


def filled_table() -> ResidentHashTable:
    table = ResidentHashTable(4, 8)
    table.insert(torch.arange(20), torch.rand(20, generator=torch.Generator().manual_seed(2)))
    return table


@pytest.mark.parametrize("call, match", [
    (lambda t: t.lookup(torch.tensor([1, EMPTY_KEY])), r"keys must not contain .* index 1"),
    (lambda t: t.insert(torch.tensor([EMPTY_KEY]), torch.ones(1)), "keys must not contain"),
    (lambda t: t.erase(torch.tensor([EMPTY_KEY])), "keys must not contain"),
    (lambda t: t.insert(torch.tensor([1], dtype=torch.int32), torch.ones(1)),
     r"keys must be a 1-D torch.int64 tensor, got a 1-D torch.int32"),
    (lambda t: t.lookup(torch.tensor([[1]])), r"keys must be a 1-D torch.int64 tensor, got a 2-D"),
    (lambda t: t.erase([1, 2]), "keys must be a 1-D torch.int64 tensor, got list"),
    (lambda t: t.insert(torch.tensor([50]), torch.ones(1, dtype=torch.float64)),
     r"scores must be a 1-D torch.float32 tensor"),
    (lambda t: t.insert(torch.tensor([50, 51]), torch.ones(3)), r"scores must have .* 3 vs 2"),
    (lambda t: t.insert(torch.tensor([50]), torch.tensor([float("nan")])),
     "scores must not be NaN"),
    (lambda t: t.update_scores(torch.tensor([32]), torch.ones(1)), r"slots must be in \[0, 32\)"),
    (lambda t: t.update_scores(torch.tensor([1, 1]), torch.ones(2)), "slots must be distinct"),
    (lambda t: t.update_scores(t.resident_keys()[1][:1], torch.ones(2)), "scores must have"),
])
def test_bad_input_leaves_table_unchanged(impl, call, match):
    table = filled_table()
    before = {k: v.clone() for k, v in table.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(table)
    for k, v in table.state_dict().items():
        assert torch.equal(v, before[k])


def test_update_scores_refuses_empty_slot():
    table = filled_table()
    empty = int((table.keys == EMPTY_KEY).nonzero()[0])
    with pytest.raises(ValueError, match=f"slots must hold resident keys, got empty slot {empty}"):
        table.update_scores(torch.tensor([empty]), torch.ones(1))


def test_scores_resident_keys_bytes_budget():
    table = filled_table()
    keys, slots = table.resident_keys()
    assert torch.equal(table.lookup(keys), slots) and keys.numel() == table.num_resident()
    table.update_scores(slots[:2], torch.tensor([7.0, 8.0]))
    assert table.scores[slots[:2]].tolist() == [7.0, 8.0]
    assert table.bytes() == sum(b.numel() * b.element_size() for b in table.buffers()) == 32 * 12
    big = ResidentHashTable.from_budget(10**6, bucket_size=64)
    assert big.bytes() <= 10**6 < big.bytes() + 64 * 12
    with pytest.raises(ValueError, match="budget_bytes must hold one bucket of 32 slots"):
        ResidentHashTable.from_budget(100)
    with pytest.raises(ValueError, match="bucket_size must be a power of two in"):
        ResidentHashTable(4, 24)
    for cls in (ResidentHashTable, InsertResult):
        assert cls.__doc__


def test_state_dict_round_trip():
    table = filled_table()
    other = ResidentHashTable(4, 8)
    other.load_state_dict(table.state_dict())
    assert torch.equal(other.keys, table.keys) and torch.equal(other.scores, table.scores)
    probe = torch.arange(-5, 30)
    assert torch.equal(other.lookup(probe), table.lookup(probe))


def corrupt_duplicate(sd):
    keys = sd["keys"]
    free = int((keys == EMPTY_KEY).nonzero()[0])
    same_bucket = keys[free // 8 * 8: free // 8 * 8 + 8]
    keys[free] = same_bucket[same_bucket != EMPTY_KEY][0]
    return "more than one slot"


def corrupt_wrong_bucket(sd):
    keys = sd["keys"]
    resident = (keys != EMPTY_KEY).nonzero().squeeze(1)
    src = int(resident[0])
    dst = int(((keys == EMPTY_KEY) & (torch.arange(32) // 8 != src // 8)).nonzero()[0])
    keys[dst], keys[src] = keys[src], EMPTY_KEY
    return "but its bucket is"


@pytest.mark.parametrize("corrupt", [
    corrupt_duplicate,
    corrupt_wrong_bucket,
    lambda sd: sd.__setitem__("keys", sd["keys"][:16]) or r"keys must be int64 \[32\]",
    lambda sd: sd.__setitem__("scores", sd["scores"].double()) or r"scores must be fp32 \[32\]",
    lambda sd: sd["scores"].__setitem__(0, float("nan")) or "scores must not be NaN",
])
def test_corrupt_state_dict_refused(corrupt):
    sd = {k: v.clone() for k, v in filled_table().state_dict().items()}
    match = corrupt(sd)
    table = ResidentHashTable(4, 8)
    table.insert(torch.tensor([1000]), torch.ones(1))
    before = table.keys.clone(), table.scores.clone()
    with pytest.raises(ValueError, match=match):
        table.load_state_dict(sd)
    assert torch.equal(table.keys, before[0]) and torch.equal(table.scores, before[1])


@NATIVE_SKIP
@pytest.mark.parametrize("op", ["hash_lookup", "hash_lookup_out", "hash_insert", "hash_erase"])
def test_opcheck(op):
    """Schema (mutations declared), fake impl and AOT dispatch of the native ops."""
    table = filled_table()
    keys = torch.arange(10, 40)
    args = {
        "hash_lookup": (table.keys, 8, keys),
        "hash_lookup_out": (table.keys, 8, keys, -1, torch.empty_like(keys)),
        "hash_insert": (table.keys, table.scores, 8, keys, torch.rand(keys.numel())),
        "hash_erase": (table.keys, table.scores, 8, keys),
    }[op]
    torch.library.opcheck(getattr(torch.ops.fiited, op), args)


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_lookup_into_out_matches_lookup(native_on, monkeypatch):
    """``dispatch.hash_lookup(..., out=)`` (the training step's reused buffer) writes exactly what
    the functional lookup returns, and refuses an out of the wrong shape or dtype."""
    if native_on == "1" and "cpu" not in native.HASH_DEVICES:
        pytest.skip("native ops not built")
    monkeypatch.setenv(dispatch.NATIVE_ENV, native_on)
    table = filled_table()
    keys = torch.cat([torch.arange(0, 300), torch.tensor([10**12, 7, 7])])
    want = dispatch.hash_lookup(table.keys, table.bucket_size, keys, 99)
    out = torch.full((keys.numel() + 5,), -7, dtype=torch.int64)[:keys.numel()]
    got = dispatch.hash_lookup(table.keys, table.bucket_size, keys, 99, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    if native_on == "1":
        for bad in (torch.empty(keys.numel() - 1, dtype=torch.int64),
                    torch.empty(keys.numel(), dtype=torch.int32),
                    torch.empty(keys.numel() * 2, dtype=torch.int64)[::2]):
            with pytest.raises(RuntimeError, match="hash_lookup: out must be a contiguous int64"):
                torch.ops.fiited.hash_lookup_out(table.keys, table.bucket_size, keys, -1, bad)


# ---- CUDA kernels (cuda/fiited_hash_cuda*.{cu,cpp}) against the CPU kernels; run on a GPU ------

CUDA_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in native.HASH_DEVICES,
    reason=f"CUDA hash-table kernels need a CUDA build of torch with a GPU and the native ops "
           f"built against it; this is torch {torch.__version__} (cuda={torch.version.cuda})")


def _on_cpu(result):
    return result.cpu() if isinstance(result, torch.Tensor) else (
        tuple(_on_cpu(r) for r in result) if isinstance(result, tuple) else result)


@CUDA_SKIP
@pytest.mark.parametrize("num_buckets, W", [(1000, 16), (64, 32), (3, 8)])
def test_cuda_matches_cpu(num_buckets, W):
    """Random batches with many repeats, ties and full buckets: every output and every slot of
    the table bitwise equal to the CPU kernels'."""
    gen = torch.Generator().manual_seed(num_buckets)
    cpu = ResidentHashTable(num_buckets, W)
    gpu = ResidentHashTable(num_buckets, W, device=torch.device("cuda"))
    for _ in range(6):
        keys, scores = random_batch(20000, gen)
        erase = keys[: keys.numel() // 40]
        want = (cpu.insert(keys, scores), cpu.lookup(keys, missing=-5), cpu.erase(erase))
        got = (gpu.insert(keys.cuda(), scores.cuda()), gpu.lookup(keys.cuda(), missing=-5),
               gpu.erase(erase.cuda()))
        for a, b in zip(want[0], got[0]):
            assert torch.equal(a, b.cpu())
        assert torch.equal(want[1], got[1].cpu()) and want[2] == got[2]
        assert torch.equal(cpu.keys, gpu.keys.cpu()) and torch.equal(cpu.scores, gpu.scores.cpu())
    assert gpu.insert(torch.empty(0, dtype=torch.int64, device="cuda"),
                      torch.empty(0, device="cuda")).slots.numel() == 0


@CUDA_SKIP
def test_cuda_full_bucket_rule():
    """The CPU test's full-bucket sequence (lowest free slot, strict beat of the minimum, pinned
    residents, evictions in slot order) on the GPU."""
    cuda = torch.device("cuda")
    table = ResidentHashTable(1, 8, device=cuda)
    table.insert(torch.arange(8, device=cuda), torch.arange(8, dtype=torch.float32, device=cuda))
    assert table.lookup(torch.arange(8, device=cuda)).tolist() == list(range(7, -1, -1))
    r = table.insert(torch.tensor([100, 101], device=cuda), torch.tensor([0.0, 5.5], device=cuda))
    assert r.slots.tolist() == [-1, 7]
    assert r.evicted_keys.tolist() == [0] and r.evicted_slots.tolist() == [7]
    r = table.insert(torch.tensor([1, 200], device=cuda), torch.tensor([0.0, 9.0], device=cuda))
    assert r.slots.tolist() == [6, 5] and r.evicted_keys.tolist() == [2]
    assert table.erase(torch.tensor([1, 1, 999], device=cuda)) == 1


@CUDA_SKIP
@pytest.mark.parametrize("call, match", [
    (lambda t, d: t.lookup(torch.tensor([1, EMPTY_KEY], device=d)), r"must not contain .* index 1"),
    (lambda t, d: t.insert(torch.tensor([5, EMPTY_KEY], device=d), torch.ones(2, device=d)),
     r"must not contain .* index 1"),
    (lambda t, d: t.insert(torch.tensor([50, 51], device=d), torch.tensor([1.0, float("nan")], device=d)),
     "scores must not be NaN"),
    (lambda t, d: t.erase(torch.tensor([EMPTY_KEY], device=d)), "must not contain"),
])
def test_cuda_bad_input_leaves_table_unchanged(call, match):
    cuda = torch.device("cuda")
    table = ResidentHashTable(4, 8, device=cuda)
    table.insert(torch.arange(20, device=cuda), torch.rand(20, device=cuda))
    before = {k: v.clone() for k, v in table.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(table, cuda)
    for k, v in table.state_dict().items():
        assert torch.equal(v, before[k])
