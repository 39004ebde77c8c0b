"""Shared builders for the tests: small table sets and random KJTs."""

from typing import List, Optional

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


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
