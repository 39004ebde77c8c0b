"""Shared builders for the tests: small table sets and random KJTs."""

from typing import Dict, List, Optional

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.modules.step_buffers import StepBuffers


def make_tables(pooling: PoolingType = PoolingType.SUM, rows: int = 40) -> List[EmbeddingBagConfig]:
    """Three tables, two dims, one table fed by two features."""
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=rows,
                           feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=rows // 2,
                           feature_names=["f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=rows,
                           feature_names=["f3"], pooling=pooling),
    ]


def random_kjt(
    tables: List[EmbeddingBagConfig],
    batch_size: int,
    gen: torch.Generator,
    max_len: int = 4,
    weighted: bool = False,
    id_range: Optional[int] = None,
) -> KeyedJaggedTensor:
    """A KJT over every feature of ``tables``, ids uniform in each table's range (or id_range)."""
    keys, values, lengths = [], [], []
    for t in tables:
        for f in t.feature_names:
            lens = torch.randint(0, max_len + 1, (batch_size,), generator=gen)
            n = int(lens.sum())
            hi = id_range or t.num_embeddings
            keys.append(f)
            lengths.append(lens)
            values.append(torch.randint(0, hi, (n,), generator=gen))
    vals = torch.cat(values)
    weights = torch.rand(vals.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=vals, lengths=torch.cat(lengths), weights=weights
    )


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def touched_rows(tables: List[EmbeddingBagConfig], kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Distinct ids (int64, ascending) each table of ``tables`` reads in ``kjt``."""
    per_feature = kjt.to_dict()
    out = {}
    for t in tables:
        ids = [per_feature[f].values() for f in t.feature_names if f in per_feature]
        out[t.name] = torch.unique(torch.cat(ids).to(torch.int64)) if ids else torch.zeros(0, dtype=torch.int64)
    return out


def assert_resident(module, rows_by_table: Dict[str, torch.Tensor]) -> None:
    """Every row of ``rows_by_table`` (table -> local rows) has an entry with every chunk live:
    store v2 admission refused nothing, so a comparison that reads these rows is not vacuous."""
    store = module.store
    for table, rows in rows_by_table.items():
        et = store.entries_of(table)
        entries = et.lookup(store.keys(table, rows))
        refused = rows[entries == et.null_entry]
        assert refused.numel() == 0, f"table {table!r}: rows {refused.tolist()} got no entry"
        pruned = (et.chunk_slots[entries] < 0).any(1)
        assert not bool(pruned.any()), f"table {table!r}: rows {rows[pruned].tolist()} lack a chunk"


def module_bytes(module) -> int:
    """Bytes of every tensor (buffer and parameter) ``module`` holds."""
    return sum(t.numel() * t.element_size() for t in list(module.buffers()) + list(module.parameters()))



class NeverReuse(StepBuffers):
    """Step buffers that hand out fresh tensors every step: the behaviour before buffers were
    reused (``modules/step_buffers.py``), to compare reuse against bit for bit."""

    def recycle(self, owned):
        owned.clear()

    def output(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)
