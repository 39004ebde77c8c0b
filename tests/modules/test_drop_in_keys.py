"""Drop-in KJT handling, as TorchRec's EmbeddingBagCollection: keys of other modules are
ignored, and a variable-batch (VBE) KJT pools like its padded equivalent."""

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.conftest import assert_resident, make_tables, random_kjt, touched_rows
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection

CFG = FiitedConfig(num_chunks=2, budget=0.5, prune_interval=2, sample_size=8)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _other_tables():
    # Large enough that budget 0.5 holds a hash bucket and some chunk slots of each pool (store v2).
    return [EmbeddingBagConfig(name="u0", embedding_dim=4, num_embeddings=300, feature_names=["g0"]),
            EmbeddingBagConfig(name="u1", embedding_dim=8, num_embeddings=250, feature_names=["g1"])]


def test_extra_keys_are_ignored(gen):
    """A KJT with other modules' features pools and trains as the KJT of the module's own."""
    both = random_kjt(_other_tables() + make_tables(), 5, gen)
    own = KeyedJaggedTensor.from_jt_dict({f: both[f] for f in ["f0", "f1", "f2", "f3"]})
    a = FiitedEmbeddingBagCollection(make_tables(), CFG)
    b = FiitedEmbeddingBagCollection(make_tables(), CFG)
    for _ in range(3):  # past a pruning cycle
        out_a, out_b = a(both), b(own)
        assert out_a.keys() == ["f0", "f1", "f2", "f3"]
        assert torch.equal(out_a.values(), out_b.values())
        out_a.values().square().sum().backward()
        out_b.values().square().sum().backward()
    _assert_same_state(a, b)
    # torchrec's own EBC takes the same KJT.
    assert EmbeddingBagCollection(tables=make_tables())(both).keys() == ["f0", "f1", "f2", "f3"]


def test_missing_keys_are_named(gen):
    kjt = random_kjt(_other_tables(), 3, gen)
    with pytest.raises(ValueError, match=r"missing \['f0', 'f1', 'f2', 'f3'\].*KJT keys \['g0', 'g1'\]"):
        FiitedEmbeddingBagCollection(make_tables(), CFG)(kjt)


class _TwoCollections(nn.Module):
    """Two FIITED collections fed by one KJT, as a model with user and item towers would be."""

    def __init__(self):
        super().__init__()
        self.first = FiitedEmbeddingBagCollection(make_tables(), CFG)
        self.second = FiitedEmbeddingBagCollection(_other_tables(), CFG)
        self.head = nn.Linear(40 + 12, 1)

    def forward(self, kjt):
        return self.head(torch.cat([self.first(kjt).values(), self.second(kjt).values()], 1)).squeeze(1)


def test_two_collections_share_one_kjt_and_train(gen):
    torch.manual_seed(0)
    model = _TwoCollections()
    dense_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    kjt = random_kjt(make_tables() + _other_tables(), 16, gen)
    labels = torch.randint(0, 2, (16,), generator=gen).float()
    losses = []
    for _ in range(6):  # three pruning cycles in each collection
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        losses.append(float(loss.detach()))
    assert int(model.first.steps_done) == int(model.second.steps_done) == 6
    for ebc in (model.first, model.second):  # both hold trained chunks
        assert all(p["resident_entries"] > 0 and sum(p["live_per_chunk"]) > 0
                   for p in ebc.stats()["pools"].values())
    assert losses[-1] < losses[0]


def _vbe_and_padded(tables, gen, weighted=False):
    """A VBE KJT (feature i has i + 2 bags, rows read them via inverse indices) and the same
    batch padded: every row's bag written out."""
    B = 7
    features = [f for t in tables for f in t.feature_names]
    rows = {t_f: t.num_embeddings for t in tables for t_f in t.feature_names}
    own = {}
    for i, f in enumerate(features):
        lens = torch.randint(0, 4, (i + 2,), generator=gen)
        own[f] = (lens, torch.randint(0, rows[f], (int(lens.sum()),), generator=gen),
                  torch.rand(int(lens.sum()), generator=gen) + 0.5)
    inverse = torch.stack([torch.randint(0, i + 2, (B,), generator=gen) for i in range(len(features))])
    vbe = KeyedJaggedTensor(
        keys=features,
        values=torch.cat([own[f][1] for f in features]),
        lengths=torch.cat([own[f][0] for f in features]),
        weights=torch.cat([own[f][2] for f in features]) if weighted else None,
        stride_per_key_per_rank=[[i + 2] for i in range(len(features))],
        inverse_indices=(features, inverse),
    )
    values, lengths, weights = [], [], []
    for i, f in enumerate(features):
        lens, ids, w = own[f]
        starts = torch.cumsum(lens, 0) - lens
        for b in inverse[i].tolist():
            lengths.append(int(lens[b]))
            values.append(ids[starts[b]: starts[b] + lens[b]])
            weights.append(w[starts[b]: starts[b] + lens[b]])
    padded = KeyedJaggedTensor.from_lengths_sync(
        keys=features, values=torch.cat(values), lengths=torch.tensor(lengths),
        weights=torch.cat(weights) if weighted else None,
    )
    return vbe, padded


@pytest.mark.parametrize("pooling, weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                               (PoolingType.SUM, True)])
def test_vbe_pools_and_trains_as_the_padded_batch(pooling, weighted, gen):
    vbe, padded = _vbe_and_padded(make_tables(pooling), gen, weighted)
    assert vbe.variable_stride_per_key()
    a = FiitedEmbeddingBagCollection(make_tables(pooling), CFG, is_weighted=weighted)
    b = FiitedEmbeddingBagCollection(make_tables(pooling), CFG, is_weighted=weighted)
    for _ in range(3):
        out_a, out_b = a(vbe), b(padded)
        assert out_a.values().shape == (7, 40)
        assert torch.equal(out_a.values(), out_b.values())
        out_a.values().square().sum().backward()
        out_b.values().square().sum().backward()
    _assert_same_state(a, b)
    a.eval()
    b.eval()
    assert torch.equal(a(vbe).values(), b(padded).values())


def test_vbe_matches_torchrec_ebc(gen):
    """At budget 1 FIITED is torchrec's EBC, VBE included. Store v2 charges every byte, so the
    tables are large and the batch reads few of their rows: a training forward admits every one
    of them with all chunks (asserted), and torchrec's EBC starts from those values."""
    tables = make_tables(rows=4000)
    fiited = FiitedEmbeddingBagCollection(make_tables(rows=4000), FiitedConfig(budget=1.0, prune_interval=0))
    vbe, padded = _vbe_and_padded(tables, gen)
    fiited(padded)  # admission only: no backward, so nothing is trained
    assert_resident(fiited, touched_rows(tables, padded))
    ref = EmbeddingBagCollection(tables=tables)
    dense = fiited.dense_weights()
    with torch.no_grad():
        for name, bag in ref.embedding_bags.items():
            bag.weight.copy_(dense[name])
    got = fiited.eval()(vbe).values()
    assert bool((got != 0).any())
    torch.testing.assert_close(got, ref(vbe).values(), rtol=1e-6, atol=1e-7)


def test_vbe_needs_inverse_indices(gen):
    vbe, _ = _vbe_and_padded(make_tables(), gen)
    bare = KeyedJaggedTensor(keys=vbe.keys(), values=vbe.values(), lengths=vbe.lengths(),
                             stride_per_key_per_rank=vbe.stride_per_key_per_rank())
    with pytest.raises(ValueError, match="VBE.*needs inverse_indices"):
        FiitedEmbeddingBagCollection(make_tables(), CFG)(bare)
