"""export_for_inference on a FIITED-2D module: only the kept columns are served, pruned ones read
zeros, fp32 stays bitwise equal to training eval, and the file round-trips."""

import dataclasses

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from tests.conftest import make_tables, random_kjt
from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection
from torchrec_fiited.inference import export_for_inference, load_inference, save_inference

CFG = dict(num_chunks=2, budget=0.5, prune_interval=3, sample_size=64, decay=0.9, enforce_ratio=0.0,
           learning_rate=0.05, seed=3)


def _trained(pooling, weighted, target=0.5, miss="zeros"):
    tables = make_tables(pooling)
    cfg = FiitedConfig(**CFG, dim_pruning={"target_ratio": target, "cold_start_steps": 4}, miss=miss)
    m = FiitedEmbeddingBagCollection(tables, cfg, is_weighted=weighted)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # the dim decision at 4, chunk cycles at 3 and 6
        m(random_kjt(tables, 16, gen, max_len=5, weighted=weighted)).values().pow(2).sum().backward()
    return m.eval(), random_kjt(tables, 24, gen, max_len=5, weighted=weighted)


@pytest.mark.parametrize("pooling, weighted, miss", [
    (PoolingType.SUM, False, "zeros"), (PoolingType.MEAN, True, "zeros"),
    (PoolingType.MEAN, True, "hashed"),  # the fallback stores (and serves) every column
])
def test_fp32_export_of_a_2d_module_is_bitwise_and_smaller(pooling, weighted, miss, tmp_path):
    m, kjt = _trained(pooling, weighted, miss=miss)
    assert all(p.stored_width == p.chunk_size // 2 for p in m.store.pools.values())
    assert bool(m.store.fallbacks) == (miss == "hashed")
    served = export_for_inference(m)
    expected = m(kjt).values()
    assert torch.equal(served(kjt).values(), expected)
    pruned = torch.ones(expected.shape[1], dtype=torch.bool)  # columns only a fallback fills
    col = 0
    for t in m.embedding_bag_configs():
        for _ in t.feature_names:
            pruned[col + m.store.stored_columns(t.name)] = False
            col += t.embedding_dim
    assert bool(expected[:, pruned].any()) == (miss == "hashed")
    for t in served.spec.tables:
        assert t.kept_columns == tuple(tuple(r) for r in m.store.dim_maps[t.name].kept.tolist())
    for name, pool in served.pools.items():
        assert pool.weights.shape[1] == m.store.pools[name].stored_width  # pruned dims not stored
    # nbytes counts the column maps too (plain attributes, not buffers).
    columns = sum(8 * c.numel() for c in served._stored_columns.values())
    assert columns > 0 and served.nbytes_by_component()["columns"] == columns
    assert served.nbytes() == columns + sum(b.numel() * b.element_size() for b in served.buffers())
    path = tmp_path / "served.pt"
    save_inference(served, path)
    assert torch.equal(load_inference(path)(kjt).values(), expected)
    for dtype, tol in (("fp16", 1e-3), ("int8", 2e-2)):
        got = export_for_inference(m, dtype)(kjt).values()
        assert bool(((got == 0) == (expected == 0)).all())  # the same columns read zero
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_spec_rejects_inconsistent_kept_columns():
    m, _ = _trained(PoolingType.SUM, False)
    spec = export_for_inference(m).spec
    t0 = spec.tables[0]
    for bad in (((0, 1),), ((1, 0), (0, 1)), ((0, 4), (0, 1)), ((0, 1, 2), (0, 1, 2))):
        tables = (dataclasses.replace(t0, kept_columns=bad),) + spec.tables[1:]
        with pytest.raises(ValueError, match="kept_columns must be 2 ascending tuples of 2 columns"):
            dataclasses.replace(spec, tables=tables)
