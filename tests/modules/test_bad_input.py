"""Bad input gets a ValueError naming the feature or table, and leaves the state unchanged."""

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.config.fiited_config import MAX_NUM_CHUNKS


def _module(**kw):
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=0.5, **kw))
    gen = torch.Generator().manual_seed(0)
    m(random_kjt(make_tables(), 4, gen)).values().sum().backward()
    return m


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _kjt(keys, values, lengths, weights=None):
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths),
                             weights=weights)


ALL = ["f0", "f1", "f2", "f3"]


@pytest.mark.parametrize(
    "kjt, message",
    [
        (_kjt(ALL, [0, 1, 40, 2], [1, 1, 1, 1]), r"feature 'f2' \(table 't1'\): id 40 outside \[0, 20\)"),
        (_kjt(ALL, [0, -1, 3, 2], [1, 1, 1, 1]), r"feature 'f1' \(table 't0'\): id -1"),
        (_kjt(["f0", "f1", "f2"], [0, 1, 2], [1, 1, 1]), r"missing \['f3'\]"),
        # Extra keys are ignored, as TorchRec's EBC does them: tests/modules/test_drop_in_keys.py.
        (_kjt(ALL, [0, 1, 2], [1, 1, 1, 1]), "lengths sum to 4 but values has 3 ids"),
        (_kjt(ALL, [0, 1, 2, 3], [1, 1, -1, 2]), "feature 'f2': negative lengths"),
        (_kjt(ALL, [], []), "empty batch"),
    ],
)
def test_malformed_batches(kjt, message):
    m = _module()
    before = _snapshot(m)
    with pytest.raises(ValueError, match=message):
        m(kjt)
    after = _snapshot(m)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_weights_of_wrong_shape():
    m = FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(budget=0.5), is_weighted=True)
    with pytest.raises(ValueError, match="weights must be a float tensor shaped like values"):
        m(_kjt(ALL, [0, 1, 2, 3], [1, 1, 1, 1], weights=torch.ones(3)))
    with pytest.raises(ValueError, match="no weights"):
        m(_kjt(ALL, [0, 1, 2, 3], [1, 1, 1, 1]))


def test_not_a_kjt():
    with pytest.raises(ValueError, match="expected a KeyedJaggedTensor"):
        _module()(torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0.0}, r"budget must be in \(0, 1\], got 0.0"),
        ({"budget": 1.5}, r"budget must be in \(0, 1\], got 1.5"),
        ({"table_budgets": {"t0": -0.1}}, r"table_budgets\['t0'\] must be in \(0, 1\]"),
        ({"num_chunks": 0}, rf"num_chunks must be an integer \[1, {MAX_NUM_CHUNKS}\], got 0"),
        ({"num_chunks": 3}, "not divisible by num_chunks=3"),
        ({"ratio_mode": "auto"}, "ratio_mode must be one of"),
        ({"utility": "grad"}, "utility must be one of"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"num_chunks": 2, "chunk_prune_ratios": [0.5]}, "must have num_chunks=2 entries"),
        ({"num_chunks": 2, "chunk_prune_ratios": [0.5, 1.0]}, r"chunk_prune_ratios\[1\] must be in \[0, 1\)"),
        ({"decay": 0.0}, r"decay must be in \(0, 1\]"),
        ({"prune_interval": -1}, "prune_interval must be an integer >= 0"),
        ({"sample_size": 0}, "sample_size must be an integer >= 1"),
        ({"enforce_ratio": 2.0}, r"enforce_ratio must be in \[0, 1\]"),
        ({"table_budgets": {"nope": 0.5}}, r"table_budgets names unknown tables \['nope'\]"),
        ({"miss": "ones"}, "miss must be one of"),
        ({"sketch_fraction": 1.0}, r"sketch_fraction must be in \[0, 1\), got 1.0"),
        ({"fallback_fraction": -0.1}, r"fallback_fraction must be in \[0, 1\)"),
        ({"entries_per_slot": 0.0}, "entries_per_slot must be > 0"),
        ({"bucket_size": 24}, r"bucket_size must be a power of two in \[8, 128\], got 24"),
        ({"budget": 1e-4}, r"budget 0.0001 .*cannot hold one bucket of 8 entries and one chunk slot "
                           r"for tables \['t0', 't2'\]"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FiitedEmbeddingBagCollection(make_tables(), FiitedConfig(**kwargs))


def test_bad_tables():
    mean_fp16 = EmbeddingBagConfig(name="h", embedding_dim=8, num_embeddings=4, feature_names=["x"],
                                   pooling=PoolingType.NONE)
    with pytest.raises(ValueError, match="table 'h': pooling must be SUM or MEAN"):
        FiitedEmbeddingBagCollection([mean_fp16], FiitedConfig())
    dotted = EmbeddingBagConfig(name="a.b", embedding_dim=8, num_embeddings=4, feature_names=["x"])
    with pytest.raises(ValueError, match="contain no '.'"):
        FiitedEmbeddingBagCollection([dotted], FiitedConfig())
