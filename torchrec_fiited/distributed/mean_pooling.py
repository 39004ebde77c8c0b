"""MEAN pooling for row-wise shards: each rank sums its part of a bag, the collection divides
by the whole bag's length (taken from the input before routing) after the reduce-scatter."""

from typing import List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def bag_lengths(features: KeyedJaggedTensor, names: List[str]) -> torch.Tensor:
    """Bag lengths fp32 [B, len(names)] of ``names``, at least 1 (an empty bag stays zero)."""
    per_key = features.to_dict()
    return torch.stack([per_key[n].lengths() for n in names], dim=1).clamp(min=1).to(torch.float32)


def divide_by_bag_length(kt: KeyedTensor, features: List[str], lengths: torch.Tensor) -> KeyedTensor:
    """Turn the summed bags of ``features`` into means (differentiable: the gradient is scaled
    the same way, as the MEAN backward would)."""
    scale = torch.ones_like(kt.values())
    offsets = dict(zip(kt.keys(), kt.offset_per_key()[:-1]))
    dims = dict(zip(kt.keys(), kt.length_per_key()))
    for j, name in enumerate(features):
        start = offsets[name]
        scale[:, start : start + dims[name]] = lengths[:, j : j + 1]
    return KeyedTensor(kt.keys(), kt.length_per_key(), kt.values() / scale, key_dim=kt.key_dim())
