"""Physical chunk pool: fixed-size weights, optimizer state and a free-slot stack."""

import torch
from torch import nn

from torchrec_fiited.store import memory
from torchrec_fiited.store.layout import slot_dtype

OPTIMIZER_STATE_SHAPES = {
    "sgd": lambda capacity, chunk_size: (0,),
    "adagrad": lambda capacity, chunk_size: (capacity, chunk_size),
    "rowwise_adagrad": lambda capacity, chunk_size: (capacity,),
}


class ChunkPool(nn.Module):
    """Slots for ``capacity`` chunks of ``chunk_size`` floats, shared by one group of tables.

    The pool is allocated once at its full capacity, so the bytes it holds never exceed the
    budget it was sized for. Slots are handed out and returned through ``free_stack`` (LIFO, the
    paper's chunk address manager); ``live_per_chunk`` counts live chunks by chunk_id for the
    admission quotas and the stats.

    Under dimension pruning (FIITED-2D, ``store.dim_map``) the pool stores only ``stored_width``
    of each chunk's ``chunk_size`` columns: ``weights`` is [capacity, stored_width] and is
    replaced, not resized in place, when that width changes (``replace_storage``).

    Args:
        capacity: number of slots.
        chunk_size: floats per (logical) chunk.
        num_chunks: K, for the per-chunk_id live counts.
        optimizer: "sgd", "adagrad" or "rowwise_adagrad"; fixes the shape of ``momentum``.
        device: where the tensors live.
    """

    def __init__(
        self,
        capacity: int,
        chunk_size: int,
        num_chunks: int,
        optimizer: str,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.capacity = capacity
        self.chunk_size = chunk_size
        self.optimizer = optimizer
        self.register_buffer("weights", memory.zeros((capacity, chunk_size), device=device))
        momentum_shape = OPTIMIZER_STATE_SHAPES[optimizer](capacity, chunk_size)
        self.register_buffer("momentum", memory.zeros(momentum_shape, device=device))
        # Reversed so that the first pops hand out slots 0, 1, 2, ...
        stack = torch.arange(capacity - 1, -1, -1, dtype=slot_dtype(capacity), device=device)
        self.register_buffer("free_stack", stack)
        self.register_buffer("num_free", torch.tensor(capacity, dtype=torch.int64, device=device))
        self.register_buffer(
            "live_per_chunk", torch.zeros(num_chunks, dtype=torch.int64, device=device)
        )

    @property
    def stored_width(self) -> int:
        """Columns each slot stores: ``chunk_size`` unless dimensions were pruned."""
        return self.weights.shape[1]

    def replace_storage(self, weights: torch.Tensor, momentum: torch.Tensor) -> None:
        """Swap in ``weights`` fp32 [capacity, w] and matching optimizer state (new tensors, so the
        old ones are freed; whoever holds them, e.g. the fused optimizer, must re-read them)."""
        want = OPTIMIZER_STATE_SHAPES[self.optimizer](self.capacity, weights.shape[1])
        if weights.shape[0] != self.capacity or tuple(momentum.shape) != tuple(want):
            raise ValueError(
                f"pool storage must be weights ({self.capacity}, w) with optimizer state {want}, "
                f"got {tuple(weights.shape)} and {tuple(momentum.shape)}"
            )
        self.weights = weights
        self.momentum = momentum

    def free_count(self) -> int:
        return int(self.num_free)

    def pop(self, n: int) -> torch.Tensor:
        """Take ``n`` free slots (int64 [n]); the caller checked ``n <= free_count()``."""
        top = int(self.num_free)
        if n > top:
            raise RuntimeError(f"[torchrec_fiited] pool has {top} free slots, {n} requested")
        slots = self.free_stack[top - n : top].flip(0).to(torch.int64)
        self.num_free -= n
        return slots

    def push(self, slots: torch.Tensor) -> None:
        """Return ``slots`` (int [n]) to the free stack; their state is reset when re-allocated."""
        n = slots.numel()
        top = int(self.num_free)
        self.free_stack[top : top + n] = slots.to(self.free_stack.dtype)
        self.num_free += n

    def reset_slots(self, slots: torch.Tensor, weights: torch.Tensor) -> None:
        """Re-initialise freshly allocated ``slots`` (int64 [n]) to ``weights`` fp32
        [n, stored_width] with zero optimizer state."""
        self.weights[slots] = weights.to(self.weights)
        if self.momentum.numel():
            self.momentum[slots] = 0.0
