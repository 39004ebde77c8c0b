"""torch.compile training equals eager training, for every table name.

Table names matter: the counter-based generator keys re-initialisation and sampling by
crc32(name), and crc32("t2") and crc32("user") are >= 2^31, which torch.compile once truncated
to int32 (``store.layout.as_int64``).
"""

import zlib

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.store.layout import counter_uniform, table_key

NAMES = ["t0", "t2", "user"]
STEPS, B, D, ROWS = 6, 8, 8, 40
CFG = FiitedConfig(num_chunks=2, budget=0.5, prune_interval=2, sample_size=8, seed=3)


def test_table_keys_cover_both_halves_of_crc32():
    assert [zlib.crc32(n.encode()) >= 2**31 for n in NAMES] == [False, True, True]


def test_counter_uniform_compiled_equals_eager_for_keys_above_int32():
    """The generator itself, compiled with the table key a dynamic int (after a recompile)."""
    rows = torch.arange(16)

    def draw(key: int, step: int) -> torch.Tensor:
        return counter_uniform([7, key, rows, step])

    compiled = torch.compile(draw, dynamic=True)
    for name in NAMES:
        for step in (1, 2):
            assert torch.equal(compiled(table_key(name), step), draw(table_key(name), step)), name


def _dlrm() -> DLRM:
    tables = [EmbeddingBagConfig(name=n, embedding_dim=D, num_embeddings=ROWS, feature_names=[f"f_{n}"])
              for n in NAMES]
    return DLRM(FiitedEmbeddingBagCollection(tables, CFG), dense_in_features=4,
                dense_arch_layer_sizes=[D], over_arch_layer_sizes=[8, 1])


def _batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(0, 3, (len(NAMES) * B,), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f_{n}" for n in NAMES], lengths=lengths,
            values=torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen))
        out.append((torch.rand(B, 4, generator=gen), kjt, torch.randint(0, 2, (B,), generator=gen).float()))
    return out


def _train(compiled: bool):
    torch.manual_seed(0)
    model = _dlrm()
    run = torch.compile(model) if compiled else model
    dense = [p for n, p in model.named_parameters() if "sparse_arch" not in n]
    opt = torch.optim.SGD(dense, lr=0.1)
    losses = []
    for dense_x, kjt, labels in _batches():
        loss = nn.functional.binary_cross_entropy_with_logits(run(dense_x, kjt).squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), model


def test_compiled_dlrm_trains_as_eager_over_three_pruning_cycles():
    eager_losses, eager = _train(compiled=False)
    compiled_losses, compiled = _train(compiled=True)
    ebc = compiled.sparse_arch.embedding_bag_collection
    assert int(ebc.steps_done) == STEPS and len(ebc._last_cycle) > 0  # cycles at steps 2, 4, 6
    # Inductor may sum the dense gradients in another order: equal to fp32 rounding.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    want, got = eager.state_dict(), compiled.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:  # chunk addresses, live masks, free stacks, steps: the same decisions
            assert torch.equal(got[key], value), key
