"""Acceptance 1: at budget 1.0 with pruning off, FIITED is TorchRec's EmbeddingBagCollection."""

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

LR = 0.1


@pytest.mark.parametrize("num_chunks", [1, 2, 4])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_sgd_step_match_torchrec(num_chunks, pooling, weighted, gen):
    if weighted and pooling == PoolingType.MEAN:
        # NOTE: torch.nn.EmbeddingBag rejects per_sample_weights with mode="mean", so TorchRec's
        # EBC has no weighted MEAN to compare with; test_weighted_mean_by_hand covers ours.
        pytest.skip("TorchRec's EBC cannot pool weighted MEAN")
    tables = make_tables(pooling)
    ref = EmbeddingBagCollection(tables=tables, is_weighted=weighted)
    cfg = FiitedConfig(num_chunks=num_chunks, budget=1.0, prune_interval=0, optimizer="sgd",
                       learning_rate=LR)
    fiited = FiitedEmbeddingBagCollection(make_tables(pooling), cfg, is_weighted=weighted)
    fiited.load_dense_weights({n: bag.weight.detach() for n, bag in ref.embedding_bags.items()})

    kjt = random_kjt(tables, batch_size=6, gen=gen, weighted=weighted)
    out_ref, out = ref(kjt), fiited(kjt)
    assert out.keys() == out_ref.keys()
    assert out.length_per_key() == out_ref.length_per_key()
    torch.testing.assert_close(out.values(), out_ref.values(), rtol=1e-6, atol=1e-7)

    upstream = torch.randn(out.values().shape, generator=gen)
    (out_ref.values() * upstream).sum().backward()
    (out.values() * upstream).sum().backward()
    with torch.no_grad():
        for bag in ref.embedding_bags.values():
            bag.weight -= LR * bag.weight.grad
    after = fiited.dense_weights()
    for name, bag in ref.embedding_bags.items():
        torch.testing.assert_close(after[name], bag.weight.detach(), rtol=1e-6, atol=1e-7)
    # The step really moved something, so the comparison above is not vacuous.
    assert any(not torch.equal(bag.weight.grad, torch.zeros_like(bag.weight)) for bag in ref.embedding_bags.values())


def test_unknown_table_in_dense_weights_is_rejected():
    fiited = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=1.0))
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        fiited.load_dense_weights({"nope": torch.zeros(3, 8)})


def test_dense_weights_need_room_for_every_chunk():
    fiited = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=0.25))
    with pytest.raises(ValueError, match="table 't0'.*free slots"):
        fiited.load_dense_weights({"t0": torch.zeros(40, 8)})


def test_weighted_mean_by_hand():
    """Weighted MEAN pools sum(w_i * x_i) / len, pruned chunks as zeros."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"],
                               pooling=PoolingType.MEAN)
    m = FiitedEmbeddingBagCollection([table], FiitedConfig(num_chunks=2, budget=1.0, prune_interval=0),
                                     is_weighted=True)
    w = torch.arange(12, dtype=torch.float32).view(3, 4)
    m.load_dense_weights({"t": w})
    m.store.evict("t", torch.tensor([2]), torch.tensor([1]))  # row 2 keeps only its first chunk
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([0, 2, 1]), lengths=torch.tensor([2, 1]),
        weights=torch.tensor([1.0, 0.5, 2.0]))
    out = m(kjt).values()
    row2 = torch.tensor([8.0, 9.0, 0.0, 0.0])
    torch.testing.assert_close(out[0], (1.0 * w[0] + 0.5 * row2) / 2)
    torch.testing.assert_close(out[1], 2.0 * w[1])
