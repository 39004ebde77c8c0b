"""A small shared embedding per table for ids without an entry (``miss="hashed"``).

CAFE (SIGMOD'24) gives its cold ids a shared hashed embedding so that they still carry signal;
here it is optional (the paper reads zeros) and sized from the budget (``store.sizing``). It is
trained by the collection's fused optimizer (same rule and hyper-parameters as the pools, with
rowwise state per fallback row).
"""

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_fiited.ops.reference import FusedParams, sparse_update
from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES
from torchrec_fiited.store.layout import _mix64, counter_uniform

_FALLBACK_SALT = 0x7F4A7C159E3779B9


class HashedFallback(nn.Module):
    """``rows`` shared rows fp32 [rows, D] of one table, read by ``mix64(key) % rows``.

    ``rows == 0`` holds nothing and reads zeros. Initialised like the table (uniform in its
    init range, from the counter generator, so the same in every process).

    Args:
        rows: H.
        dim: D.
        optimizer: the pools' optimizer ("sgd", "adagrad", "rowwise_adagrad").
        init: (low, high) of the uniform initialisation.
        seed: key of the initial values.
        device: where the tensors live.
    """

    def __init__(self, rows: int, dim: int, optimizer: str, init, seed: int, device: torch.device) -> None:
        super().__init__()
        self.rows = int(rows)
        idx = torch.arange(self.rows, dtype=torch.int64, device=device).unsqueeze(1)
        cols = torch.arange(dim, dtype=torch.int64, device=device)
        u = counter_uniform([seed, _FALLBACK_SALT, idx, cols]) if self.rows else torch.zeros(0, dim)
        self.register_buffer("weights", (init[0] + (init[1] - init[0]) * u).to(device))
        self.register_buffer(
            "momentum", torch.zeros(OPTIMIZER_STATE_SHAPES[optimizer](self.rows, dim), device=device)
        )

    def rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        """Fallback row int64 [n] of each key."""
        return torch.remainder(_mix64(keys ^ _FALLBACK_SALT), max(1, self.rows))

    def pooled(self, keys, miss, offsets, per_sample_weights, mean: bool) -> torch.Tensor:
        """fp32 [B, D]: the bags' sums (means) of fallback rows over the ids with ``miss`` set."""
        w = miss.to(self.weights.dtype)
        if per_sample_weights is not None:
            w = w * per_sample_weights
        out = F.embedding_bag(
            self.rows_of(keys), self.weights, offsets, mode="sum", per_sample_weights=w,
            include_last_offset=True,
        )
        if mean:
            out = out / (offsets[1:] - offsets[:-1]).clamp(min=1).to(out.dtype).unsqueeze(1)
        return out

    def update(self, keys: torch.Tensor, grads: torch.Tensor, params: FusedParams) -> None:
        """One optimizer step from per-id gradients ``grads`` fp32 [n, D] of missing ``keys``."""
        if self.rows == 0 or keys.numel() == 0:
            return
        rows, inverse = torch.unique(self.rows_of(keys), return_inverse=True)
        summed = grads.new_zeros(rows.numel(), grads.shape[1]).index_add_(0, inverse, grads)
        sparse_update(self.weights, self.momentum, rows, summed, params)
