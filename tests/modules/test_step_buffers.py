"""Training steps reuse their per-id buffers (``modules/step_buffers.py``): the result must be
bitwise what fresh tensors give, in every order of forwards and backwards a training loop can
take, and the buffers must really be reused."""

import pytest
import torch

from tests.conftest import NeverReuse, make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.modules.step_buffers import StepBuffers


def _module(reuse: bool, weighted: bool = False) -> FiitedEmbeddingBagCollection:
    torch.manual_seed(0)
    cfg = FiitedConfig(num_chunks=2, budget=0.3, prune_interval=3, learning_rate=0.1, seed=4)
    ebc = FiitedEmbeddingBagCollection(make_tables(), cfg, is_weighted=weighted)
    if not reuse:
        ebc._step_buffers = NeverReuse()
    return ebc


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert torch.equal(sa[k], sb[k]), k


def _schedule(ebc, plan, weighted=False):
    """Runs ``plan``: 's' a step, 'e' an eval forward, 'f' a forward whose graph is dropped,
    'a' two forwards then one backward through their sum (gradient accumulation)."""
    gen = torch.Generator().manual_seed(1)
    outs = []
    for op in plan:
        if op == "e":
            with torch.no_grad():
                outs.append(ebc(random_kjt(make_tables(), 12, gen, weighted=weighted)).values())
            continue
        n = 2 if op == "a" else 1
        values = [ebc(random_kjt(make_tables(), 12, gen, weighted=weighted)).values()
                  for _ in range(n)]
        if op == "f":
            continue
        loss = sum((v * torch.randn(v.shape, generator=gen)).sum() for v in values)
        loss.backward()
        outs.extend(v.detach() for v in values)
    return outs


@pytest.mark.parametrize("plan", ["sssssss", "sesfsesas", "asfsass"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reuse_trains_bitwise_as_fresh_tensors(plan, weighted):
    reused, fresh = _module(True, weighted), _module(False, weighted)
    outs_r = _schedule(reused, plan, weighted)
    outs_f = _schedule(fresh, plan, weighted)
    for a, b in zip(outs_r, outs_f):
        assert torch.equal(a, b)
    _states_equal(reused, fresh)


def test_buffers_are_reused_across_steps():
    ebc = _module(True)
    gen = torch.Generator().manual_seed(1)
    kjt = random_kjt(make_tables(), 12, gen)
    seen = []
    resolve = ebc._resolve

    def spy(features, reuse=False):
        batch = resolve(features, reuse)
        seen.append((reuse, batch))
        return batch

    ebc._resolve = spy
    for _ in range(3):
        ebc(kjt).values().sum().backward()
    ptrs = [{pb.keys.data_ptr() for pb in b.pools} for _, b in seen]
    assert ptrs[1] == ptrs[2] and ptrs[0] == ptrs[1]  # the same storage every step
    assert ebc._step_buffers.free_bytes > 0
    with torch.no_grad():  # an inference forward releases its batch at once
        ebc(kjt)
        ebc(kjt)
    assert {pb.keys.data_ptr() for pb in seen[-1][1].pools} == ptrs[0]


def test_second_backward_through_one_forward_is_refused():
    ebc = _module(True)
    out = ebc(random_kjt(make_tables(), 12, torch.Generator().manual_seed(1))).values()
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()


def test_take_prefers_the_smallest_fitting_buffer_and_recycle_drops_the_unused():
    buffers = StepBuffers()
    owned = []
    a = buffers.take(100, torch.int64, torch.device("cpu"), owned)
    b = buffers.take(10, torch.int64, torch.device("cpu"), owned)
    assert a.numel() == 100 and b.numel() == 10 and len(owned) == 2
    buffers.recycle(owned)
    assert owned == [] and buffers.free_bytes >= 110 * 8
    step = []
    c = buffers.take(5, torch.int64, torch.device("cpu"), step)
    assert c.data_ptr() == b.data_ptr()  # the 10-element buffer, not the 100
    d = buffers.take(5, torch.float32, torch.device("cpu"), step)  # no float buffer: fresh
    assert d.dtype == torch.float32 and d.data_ptr() not in (a.data_ptr(), b.data_ptr())
    buffers.recycle(step)  # the 100-element buffer was not needed: dropped
    assert buffers.free_bytes == step_bytes(c, d)


def step_bytes(*views):
    return sum(v.untyped_storage().nbytes() for v in views)


def test_output_storage_is_reused_only_when_nothing_holds_it():
    ebc = _module(True)
    gen = torch.Generator().manual_seed(1)
    kjts = [random_kjt(make_tables(), 12, gen) for _ in range(4)]
    out = ebc(kjts[0]).values()
    out.sum().backward()
    first = out.untyped_storage().data_ptr()
    del out
    out = ebc(kjts[1]).values()  # the first step's output is gone: its storage serves again
    assert out.untyped_storage().data_ptr() == first
    out.sum().backward()
    kept, kept_values = out, out.detach().clone()  # the caller keeps this one
    out = ebc(kjts[2]).values()
    assert out.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    out.mul_(1.0)  # a fresh tensor to autograd, not a view: in-place ops stay allowed
    out.sum().backward()
    assert torch.equal(kept, kept_values)
    saved, saved_values = out.detach()[2:5], out.detach()[2:5].clone()
    del out  # only a view of the cached storage survives: it still holds it
    out = ebc(kjts[3]).values()
    assert out.untyped_storage().data_ptr() != saved.untyped_storage().data_ptr()
    assert torch.equal(saved, saved_values)
