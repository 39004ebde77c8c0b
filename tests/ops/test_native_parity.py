"""Native FIITED ops (``torch.ops.fiited``) against the pure-PyTorch reference.

Random stores and batches cover K in {1, 2, 4, 8}, D in {16, 64, 128}, SUM/MEAN, weighted and
unweighted bags, pooling factors 1 and 20, several pruned fractions, repeated ids and empty bags;
D=24 also runs the kernels' run-time-shape path (the others have compile-time shapes).
FP32 tolerance: rtol 1e-5 (the native kernels sum in a different order, and may fuse multiply-adds).
"""

import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import torchrec_fiited
from torchrec_fiited.ops import dispatch, native, reference
from torchrec_fiited.ops.reference import FusedParams

pytestmark = pytest.mark.skipif(
    not native.AVAILABLE, reason="native ops not built: run `make ext` (make test builds them)"
)

RTOL, ATOL = 1e-5, 1e-5
CUDA_SKIP_REASON = (
    f"CUDA kernels need a CUDA build of torch with a GPU; this is torch {torch.__version__} "
    f"(cuda={torch.version.cuda}, GPU available={torch.cuda.is_available()})"
)


@dataclass
class Store:
    """A table's slice of the VHPI store (terms as in ``store/layout.py``)."""

    chunk_slots: torch.Tensor  # int32 [E, K]
    utilities: torch.Tensor  # fp32 [E, K], against a base step
    weights: torch.Tensor  # fp32 [C, chunk_size]
    momentum: torch.Tensor  # per optimizer

    def clone(self) -> "Store":
        return Store(*(t.clone() for t in self.tensors()))

    def tensors(self):
        return self.chunk_slots, self.utilities, self.weights, self.momentum

    def to(self, device) -> "Store":
        return Store(*(t.to(device) for t in self.tensors()))


@dataclass
class Batch:
    """One feature's bags, plus what the module derives for the backward."""

    entries: torch.Tensor  # int64 [n]
    offsets: torch.Tensor  # int64 [B + 1]
    weights: Optional[torch.Tensor]  # fp32 [n]
    row_of_id: torch.Tensor  # int64 [n]
    id_scale: Optional[torch.Tensor]  # fp32 [n]


def make_store(E, K, cs, pruned, optimizer, step, gen, slots_dtype=torch.int32) -> Store:
    live = torch.rand(E, K, generator=gen) >= pruned
    n_live = int(live.sum())
    C = n_live + 5  # a few free slots, as in a real pool
    slots = torch.full((E, K), -1, dtype=torch.int32)
    slots[live] = torch.randperm(C, generator=gen)[:n_live].to(torch.int32)
    momentum_shape = {"sgd": (0,), "adagrad": (C, cs), "rowwise_adagrad": (C,)}[optimizer]
    return Store(
        chunk_slots=slots.to(slots_dtype),  # int16 in a pool of at most 2^15 slots
        utilities=torch.rand(E, K, generator=gen) * 3,
        weights=torch.randn(C, cs, generator=gen),
        momentum=torch.rand(momentum_shape, generator=gen),
    )


def make_batch(E, B, L, weighted, mean, gen) -> Batch:
    """Bags of L ids (about 1 in 8 empty), ids drawn from E entries so that many repeat."""
    lengths = torch.full((B,), L, dtype=torch.int64)
    lengths[torch.rand(B, generator=gen) < 0.125] = 0
    n = int(lengths.sum())
    entries = torch.randint(0, E, (n,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    weights = torch.rand(n, generator=gen) + 0.5 if weighted else None
    rows = torch.repeat_interleave(torch.arange(B), lengths)
    scale = (1.0 / lengths.clamp(min=1).float())[rows] if mean else None
    if weights is not None:
        scale = weights if scale is None else scale * weights
    return Batch(entries, offsets, weights, rows, scale)


SHAPES = list(itertools.product([1, 2, 4, 8], [16, 64, 128, 24]))  # (K, D)
# K, D, SUM/MEAN, weighted, pooling factor, pruned fraction: 4 * 4 * 2 * 2 * 2 * 3 = 384 cases.
FORWARD_CASES = [
    (K, D, *rest)
    for (K, D), rest in itertools.product(
        SHAPES, itertools.product([False, True], [False, True], [1, 20], [0.0, 0.5, 0.9])
    )
]


@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("K,D", SHAPES)
def test_lookup_forward_matches_reference(K, D, slots_dtype):
    gen = torch.Generator().manual_seed(K * 1000 + D)
    for _, _, mean, weighted, L, pruned in (c for c in FORWARD_CASES if c[:2] == (K, D)):
        E = 300
        store = make_store(E, K, D // K, pruned, "sgd", 10, gen, slots_dtype)
        batch = make_batch(E, 33, L, weighted, mean, gen)
        args = (store.weights, store.chunk_slots, batch.entries, batch.offsets, batch.weights, mean)
        got = torch.ops.fiited.lookup_forward(*args)
        want = reference.lookup_forward(*args)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"mean={mean} weighted={weighted} L={L} "
                                   f"pruned={pruned}: {m}")


@pytest.mark.parametrize("K,D", [(4, 64), (2, 24)])
def test_lookup_forward_out_writes_a_column_block(K, D):
    """The out variant fills a column block of a wider output and leaves the rest alone."""
    gen = torch.Generator().manual_seed(K + D)
    store = make_store(300, K, D // K, 0.5, "sgd", 10, gen)
    batch = make_batch(300, 33, 20, True, True, gen)
    args = (store.weights, store.chunk_slots, batch.entries, batch.offsets, batch.weights, True)
    full = torch.full((33, D + 10), 7.0)
    torch.ops.fiited.lookup_forward_out(*args, full[:, 3:3 + D])
    torch.testing.assert_close(full[:, 3:3 + D], reference.lookup_forward(*args), rtol=RTOL,
                               atol=ATOL)
    assert bool((full[:, :3] == 7).all()) and bool((full[:, 3 + D:] == 7).all())
    with pytest.raises(RuntimeError, match=r"out must have unit column stride"):
        torch.ops.fiited.lookup_forward_out(*args, torch.zeros(D, 33).t())


def _backward_both(store, batch, grad_rows, params, device="cpu", miss_gains=None):
    """Run the native op on ``device`` and the reference on CPU from the same state; with
    ``miss_gains`` (fp32 [G, K]), also compare what the miss groups E + g earn."""
    got, want = store.to(device), store.clone()
    got_gains = None if miss_gains is None else miss_gains.to(device)
    want_gains = None if miss_gains is None else miss_gains.clone()
    torch.ops.fiited.fused_backward(
        grad_rows.to(device), batch.row_of_id.to(device),
        None if batch.id_scale is None else batch.id_scale.to(device), batch.entries.to(device),
        got.chunk_slots, got.utilities, got.weights, got.momentum,
        params.optimizer, params.lr, params.eps, params.weight_decay, params.utility,
        utility_scale(params), got_gains,
    )
    reference.fused_backward(
        grad_rows, batch.row_of_id, batch.id_scale, batch.entries, want.chunk_slots,
        want.utilities, want.weights, want.momentum, params, utility_scale(params), want_gains,
    )
    if miss_gains is not None:
        torch.testing.assert_close(got_gains.cpu(), want_gains, rtol=RTOL, atol=ATOL)
    return got.to("cpu"), want


def utility_scale(params: FusedParams) -> float:
    """gamma^(base - step) for a table whose base step is 2 (not 1: the scale must show)."""
    return params.decay ** (2 - params.step)


def _assert_same_state(got: Store, want: Store, context: str) -> None:
    assert torch.equal(got.chunk_slots, want.chunk_slots), context
    for name in ("utilities", "weights", "momentum"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name} ({context}): {m}")


def _backward_cases(K, D, optimizer, device="cpu", E=300, B=33, slots_dtype=torch.int32):
    """(weighted, MEAN) x L x pruned fraction; utility and weight decay alternate."""
    gen = torch.Generator().manual_seed(K * 7919 + D * 31 + len(optimizer))
    cases = itertools.product([(False, False), (True, False), (True, True)], [1, 20],
                              [0.0, 0.5, 0.9])
    for i, ((weighted, mean), L, pruned) in enumerate(cases):
        step = 50
        utility = ("grad_access", "access")[i % 2]
        store = make_store(E, K, D // K, pruned, optimizer, step, gen, slots_dtype)
        batch = make_batch(E, B, L, weighted, mean, gen)
        miss_gains = None
        if i % 3 == 2:  # ids skipped with entry -1
            batch.entries[torch.rand(batch.entries.numel(), generator=gen) < 0.3] = -1
        elif i % 3 == 1:  # the collection's misses: groups E + g, some repeated, some not seen
            G = 17
            miss = torch.rand(batch.entries.numel(), generator=gen) < 0.4
            batch.entries[miss] = E + torch.randint(0, G, (int(miss.sum()),), generator=gen)
            miss_gains = torch.rand(G, K, generator=gen)
        grad_rows = torch.randn(B, D, generator=gen)
        params = FusedParams(optimizer, 0.05, 1e-8, 0.01 * (i // 2 % 2), utility, 0.95, step)
        got, want = _backward_both(store, batch, grad_rows, params, device, miss_gains)
        _assert_same_state(got, want, f"weighted={weighted} mean={mean} L={L} pruned={pruned} "
                                      f"utility={utility} wd={params.weight_decay}")


@pytest.mark.parametrize("slots_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("optimizer", reference.OPTIMIZERS)
@pytest.mark.parametrize("K,D", SHAPES)
def test_fused_backward_matches_reference(K, D, optimizer, slots_dtype):
    _backward_cases(K, D, optimizer, slots_dtype=slots_dtype)


def test_multithreaded_paths_match_reference():
    """Inputs large enough for the kernels to split bags, ids and entries across threads."""
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: the kernels do not split the work")
    gen = torch.Generator().manual_seed(11)
    store = make_store(5000, 4, 16, 0.5, "rowwise_adagrad", 9, gen)
    batch = make_batch(5000, 1024, 20, True, True, gen)
    args = (store.weights, store.chunk_slots, batch.entries, batch.offsets, batch.weights, True)
    torch.testing.assert_close(torch.ops.fiited.lookup_forward(*args),
                               reference.lookup_forward(*args), rtol=RTOL, atol=ATOL)
    params = FusedParams("rowwise_adagrad", 0.05, 1e-8, 0.01, "grad_access", 0.95, 9)
    got, want = _backward_both(store, batch, torch.randn(1024, 64, generator=gen), params)
    _assert_same_state(got, want, "multithreaded")


@pytest.mark.parametrize("native_op", [True, False])
def test_fused_backward_skips_minus_one_ids(native_op):
    """An id with entry -1 changes nothing: the state is bitwise that of a call without it, and a
    call whose ids are all skipped is a no-op. Below -1 is refused."""
    gen = torch.Generator().manual_seed(5)
    store = make_store(300, 4, 16, 0.5, "rowwise_adagrad", 9, gen)
    batch = make_batch(300, 64, 20, True, True, gen)
    grad_rows = torch.randn(64, 64, generator=gen)
    params = FusedParams("rowwise_adagrad", 0.05, 1e-8, 0.01, "grad_access", 0.95, 9)
    skip = torch.rand(batch.entries.numel(), generator=gen) < 0.3
    op = _native_backward if native_op else _reference_backward
    with_skips, without = store.clone(), store.clone()
    op(with_skips, grad_rows, batch.row_of_id, batch.id_scale,
       torch.where(skip, -1, batch.entries), params)
    keep = ~skip
    op(without, grad_rows, batch.row_of_id[keep], batch.id_scale[keep], batch.entries[keep], params)
    for name in ("chunk_slots", "utilities", "weights", "momentum"):
        assert torch.equal(getattr(with_skips, name), getattr(without, name)), name
    untouched = store.clone()
    op(untouched, grad_rows, batch.row_of_id, batch.id_scale,
       torch.full_like(batch.entries, -1), params)
    for name in ("utilities", "weights", "momentum"):
        assert torch.equal(getattr(untouched, name), getattr(store, name)), name
    if native_op:
        with pytest.raises(RuntimeError, match=r"entries\[0\] must be in \[0, E=300\), got -2"):
            op(store.clone(), grad_rows, batch.row_of_id, batch.id_scale,
               torch.full_like(batch.entries, -2), params)


def test_fused_backward_miss_groups_earn_like_entries_without_chunks():
    """Ids at E + g earn into miss_utilities[g] exactly what an entry whose chunks are all
    pruned earns (unscaled), change nothing else, and E + G is refused with the state unchanged."""
    gen = torch.Generator().manual_seed(8)
    store = make_store(300, 4, 16, 0.5, "rowwise_adagrad", 9, gen)
    batch = make_batch(300, 64, 20, True, True, gen)
    grad_rows = torch.randn(64, 64, generator=gen)
    params = FusedParams("rowwise_adagrad", 0.05, 1e-8, 0.01, "grad_access", 0.95, 9)
    miss = batch.entries < 40  # entries 0..39 play the misses, as groups 0..39
    merged = torch.where(miss, batch.entries + 300, batch.entries)
    gains = torch.zeros(40, 4)
    got = store.clone()
    torch.ops.fiited.fused_backward(
        grad_rows, batch.row_of_id, batch.id_scale, merged, got.chunk_slots, got.utilities,
        got.weights, got.momentum, params.optimizer, params.lr, params.eps, params.weight_decay,
        params.utility, utility_scale(params), gains)
    hits_only = store.clone()
    _native_backward(hits_only, grad_rows, batch.row_of_id, batch.id_scale,
                     torch.where(miss, -1, batch.entries), params)
    for name in ("utilities", "weights", "momentum"):
        assert torch.equal(getattr(got, name), getattr(hits_only, name)), name
    pruned = store.clone()
    pruned.chunk_slots[:40] = -1
    pruned.utilities[:40] = 0
    torch.ops.fiited.fused_backward(
        grad_rows, batch.row_of_id[miss], batch.id_scale[miss], batch.entries[miss],
        pruned.chunk_slots, pruned.utilities, pruned.weights, pruned.momentum, params.optimizer,
        params.lr, params.eps, params.weight_decay, params.utility, 1.0)
    assert torch.equal(gains, pruned.utilities[:40])
    assert bool((gains > 0).any())
    before = got.clone(), gains.clone()
    with pytest.raises(RuntimeError, match=r"entries\[\d+\] must be in \[0, E \+ G \(G = "
                                           r"miss_utilities.size\(0\)\)=340\), got 340"):
        torch.ops.fiited.fused_backward(
            grad_rows, batch.row_of_id, batch.id_scale, torch.where(miss, 340, merged),
            got.chunk_slots, got.utilities, got.weights, got.momentum, params.optimizer, params.lr,
            params.eps, params.weight_decay, params.utility, utility_scale(params), gains)
    assert torch.equal(gains, before[1])
    for name in ("utilities", "weights", "momentum"):
        assert torch.equal(getattr(got, name), getattr(before[0], name)), name


def _native_backward(st: Store, grad_rows, rows, scale, entries, params) -> None:
    torch.ops.fiited.fused_backward(
        grad_rows, rows, scale, entries, st.chunk_slots, st.utilities, st.weights, st.momentum,
        params.optimizer, params.lr, params.eps, params.weight_decay, params.utility,
        utility_scale(params),
    )


def _reference_backward(st: Store, grad_rows, rows, scale, entries, params) -> None:
    reference.fused_backward(grad_rows, rows, scale, entries, st.chunk_slots, st.utilities,
                             st.weights, st.momentum, params, utility_scale(params))


def test_fused_backward_no_ids_is_a_no_op():
    gen = torch.Generator().manual_seed(0)
    store = make_store(20, 2, 4, 0.5, "rowwise_adagrad", 3, gen)
    batch = make_batch(20, 4, 1, False, False, gen)
    empty = torch.zeros(0, dtype=torch.int64)
    got = store.clone()
    torch.ops.fiited.fused_backward(
        torch.randn(4, 8), empty, None, empty, got.chunk_slots, got.utilities, got.weights,
        got.momentum, "rowwise_adagrad", 0.1, 1e-8, 0.0, "grad_access", 0.9,
    )
    _assert_same_state(got, store, "no ids")
    assert batch.entries.numel() > 0


def test_lookup_forward_no_bags_and_no_ids():
    gen = torch.Generator().manual_seed(0)
    store = make_store(20, 4, 4, 0.5, "sgd", 3, gen)
    empty = torch.zeros(0, dtype=torch.int64)
    out = torch.ops.fiited.lookup_forward(store.weights, store.chunk_slots, empty,
                                          torch.zeros(1, dtype=torch.int64), None, True)
    assert out.shape == (0, 16)
    out = torch.ops.fiited.lookup_forward(store.weights, store.chunk_slots, empty,
                                          torch.zeros(4, dtype=torch.int64), None, True)
    assert torch.equal(out, torch.zeros(3, 16))


def _opcheck_inputs(optimizer="rowwise_adagrad"):
    gen = torch.Generator().manual_seed(5)
    store = make_store(50, 4, 4, 0.5, optimizer, 7, gen)
    batch = make_batch(50, 6, 3, True, True, gen)
    lookup = (store.weights, store.chunk_slots, batch.entries, batch.offsets, batch.weights, True)
    backward = (
        torch.randn(6, 16, generator=gen), batch.row_of_id, batch.id_scale, batch.entries,
        *store.tensors(), optimizer, 0.1, 1e-8, 0.01, "grad_access", 1.5,
    )
    return lookup, backward


def test_opcheck_lookup_forward():
    lookup, _ = _opcheck_inputs()
    torch.library.opcheck(torch.ops.fiited.lookup_forward.default, lookup)
    out = torch.zeros(lookup[3].numel() - 1, 16)
    torch.library.opcheck(torch.ops.fiited.lookup_forward_out.default, (*lookup, out))


@pytest.mark.parametrize("optimizer", reference.OPTIMIZERS)
def test_opcheck_fused_backward(optimizer):
    _, backward = _opcheck_inputs(optimizer)
    torch.library.opcheck(torch.ops.fiited.fused_backward.default, backward)


def test_bad_inputs_name_the_argument():
    lookup, backward = _opcheck_inputs()
    weights, slots, entries, offsets, psw, mean = lookup
    with pytest.raises(RuntimeError, match=r"\[torchrec_fiited\] fiited::lookup_forward: "
                                           r"chunk_slots must be a 2-D Short or Int tensor on cpu, "
                                           r"got a 2-D Long tensor"):
        torch.ops.fiited.lookup_forward(weights, slots.long(), entries, offsets, psw, mean)
    with pytest.raises(RuntimeError, match=r"entries\[0\] must be in \[0, E=50\), got 50"):
        torch.ops.fiited.lookup_forward(weights, slots, torch.full_like(entries, 50), offsets,
                                        psw, mean)
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0, got 1"):
        torch.ops.fiited.lookup_forward(weights, slots, entries, offsets + 1, psw, mean)
    bad = list(backward)
    bad[8] = "adam"
    with pytest.raises(RuntimeError, match="optimizer must be one of sgd, adagrad, "
                                           "rowwise_adagrad, got 'adam'"):
        torch.ops.fiited.fused_backward(*bad)
    bad = list(backward)
    bad[7] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"momentum must have shape \(C\) for rowwise_adagrad"):
        torch.ops.fiited.fused_backward(*bad)
    for scale in (0.0, float("inf"), 1e39):  # 1e39 overflows fp32
        bad = list(backward)
        bad[13] = scale
        with pytest.raises(RuntimeError, match=r"utility_scale must be finite and > 0 in fp32"):
            torch.ops.fiited.fused_backward(*bad)


def test_bad_row_leaves_the_state_untouched():
    _, backward = _opcheck_inputs()
    bad = list(backward)
    bad[1] = bad[1].clone()
    bad[1][-1] = 6  # grad_rows has 6 rows
    before = [t.clone() for t in bad[4:8]]
    with pytest.raises(RuntimeError, match=r"row_of_id\[\d+\] must be in \[0, R=grad_rows"):
        torch.ops.fiited.fused_backward(*bad)
    for b, a in zip(before, bad[4:8]):
        assert torch.equal(a, b)


def test_dispatch_out_variant_matches_on_both_paths(monkeypatch):
    lookup, _ = _opcheck_inputs()
    want = reference.lookup_forward(*lookup)
    for flag in ("1", "0"):
        monkeypatch.setenv(dispatch.NATIVE_ENV, flag)
        out = torch.zeros_like(want)
        dispatch.lookup_forward_out(*lookup, out)
        torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)


def test_dispatch_env_var_forces_the_reference(monkeypatch):
    assert dispatch.use_native(torch.device("cpu"))
    calls = []
    monkeypatch.setattr(reference, "lookup_forward", lambda *a: calls.append(a) or "reference")
    lookup, _ = _opcheck_inputs()
    monkeypatch.setenv(dispatch.NATIVE_ENV, "0")
    assert dispatch.lookup_forward(*lookup) == "reference" and len(calls) == 1
    monkeypatch.setenv(dispatch.NATIVE_ENV, "1")
    assert isinstance(dispatch.lookup_forward(*lookup), torch.Tensor) and len(calls) == 1


def test_module_training_matches_reference(monkeypatch):
    """A few training steps of FiitedEmbeddingBagCollection give the same state on both paths."""
    # Imported here: the rest of this file needs torch alone, so its CUDA tests run on a GPU
    # machine without torchrec (benchmarks/device_check.sh runs them with --noconftest).
    from tests.conftest import make_tables, random_kjt

    states = []
    for flag in ("1", "0"):
        monkeypatch.setenv(dispatch.NATIVE_ENV, flag)
        gen = torch.Generator().manual_seed(3)
        ebc = torchrec_fiited.FiitedEmbeddingBagCollection(
            make_tables(), torchrec_fiited.FiitedConfig(num_chunks=2, budget=0.5, prune_interval=3),
            is_weighted=True,
        )
        for _ in range(7):
            out = ebc(random_kjt(make_tables(), 8, gen, weighted=True)).values()
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
        states.append(ebc.state_dict())
    for key, value in states[0].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, states[1][key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key}: {m}")


@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in native.DEVICES),
                    reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("K,D", [(1, 64), (4, 64), (8, 128), (2, 16)])
def test_cuda_matches_reference(K, D):
    gen = torch.Generator().manual_seed(K + D)
    for mean, weighted, L, pruned, slots_dtype in itertools.product(
            [False, True], [False, True], [1, 20], [0.0, 0.5], [torch.int32, torch.int16]):
        store = make_store(300, K, D // K, pruned, "sgd", 10, gen, slots_dtype)
        batch = make_batch(300, 33, L, weighted, mean, gen)
        args = (store.weights, store.chunk_slots, batch.entries, batch.offsets, batch.weights, mean)
        on_gpu = [a.cuda() if torch.is_tensor(a) else a for a in args]
        got = torch.ops.fiited.lookup_forward(*on_gpu)
        torch.testing.assert_close(got.cpu(), reference.lookup_forward(*args), rtol=RTOL, atol=ATOL)
    for optimizer, slots_dtype in itertools.product(reference.OPTIMIZERS, [torch.int32, torch.int16]):
        _backward_cases(K, D, optimizer, device="cuda", slots_dtype=slots_dtype)


@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in native.DEVICES),
                    reason=CUDA_SKIP_REASON)
def test_cuda_bad_bounds_are_refused_and_leave_the_state_untouched():
    """The CUDA host decides every bound of a call on the device in one transfer; a failing
    one is then named with its values, as on the CPU, before any kernel runs."""
    lookup, backward = _opcheck_inputs()
    lookup = [a.cuda() if torch.is_tensor(a) else a for a in lookup]
    backward = [a.cuda() if torch.is_tensor(a) else a for a in backward]
    weights, slots, entries, offsets, psw, mean = lookup
    with pytest.raises(RuntimeError, match=r"entries must be in \[0, E=50\), got values in"):
        torch.ops.fiited.lookup_forward(weights, slots, torch.full_like(entries, 50), offsets,
                                        psw, mean)
    with pytest.raises(RuntimeError, match=r"offsets must start at 0, be non-decreasing"):
        torch.ops.fiited.lookup_forward(weights, slots, entries, offsets + 1, psw, mean)
    B, D = offsets.numel() - 1, weights.shape[1] * slots.shape[1]
    out = torch.zeros(B, 2 * D, device="cuda")
    with pytest.raises(RuntimeError, match=r"feature_cols\[0\]=.* outside out's"):
        torch.ops.fiited.lookup_forward_batched_out(
            weights, slots, entries, offsets, psw, torch.tensor([D + 1], device="cuda"),
            torch.tensor([False], device="cuda"), out)
    assert not out.any()
    for position, value, match in ((3, 50, r"entries must be in \[-1, E=50\)"),
                                   (1, 6, r"row_of_id must be in \[0, R=grad_rows")):
        bad = list(backward)
        bad[position] = bad[position].clone()
        bad[position][-1] = value
        before = [t.clone() for t in bad[4:8]]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fiited.fused_backward(*bad)
        for b, a in zip(before, bad[4:8]):
            assert torch.equal(a, b)
