"""The table-batched update reads the output gradient in place when a pool is updated in one call;
it must train exactly as the stacked per-group path (issue 12)."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from tests.conftest import random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.modules import fiited_ebc


def _tables(pooling):
    # One pool (same D), two features on one table, features not in table order in the output.
    return [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=60, feature_names=["f0", "f2"],
                           pooling=pooling),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=30, feature_names=["f1"],
                           pooling=pooling),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=90, feature_names=["f3"],
                           pooling=pooling),
    ]


def _train(tables, group_ids, monkeypatch, weighted, budget):
    monkeypatch.setattr(fiited_ebc, "_GROUP_IDS", group_ids)
    torch.manual_seed(0)
    cfg = FiitedConfig(num_chunks=2, budget=budget, prune_interval=3, learning_rate=0.1, seed=4,
                       optimizer="rowwise_adagrad")
    ebc = FiitedEmbeddingBagCollection(tables, cfg, is_weighted=weighted)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        kjt = random_kjt(tables, 16, gen, weighted=weighted)
        out = ebc(kjt).values()
        out.backward(torch.randn(out.shape, generator=gen))
    return ebc


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("budget", [1.0, 0.3])
def test_in_place_gradient_trains_as_the_stacked_path(pooling, weighted, budget, monkeypatch):
    tables = _tables(pooling)
    one_call = _train(tables, 1 << 18, monkeypatch, weighted, budget)  # in place
    per_table = _train(_tables(pooling), 1, monkeypatch, weighted, budget)  # stacked per group
    a, b = one_call.state_dict(), per_table.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
