"""Pure-PyTorch reference of the resident-id hash table ops (``store.hash_table``).

The table is two flat tensors of S = num_buckets * bucket_size slots: ``table_keys`` int64 [S]
(``EMPTY_KEY`` where free) and ``table_scores`` fp32 [S]. Bucket b owns slots
[b * bucket_size, (b + 1) * bucket_size); a key lives only in ``bucket_of(key)``. These functions
are the contract the native kernels (``cuda/fiited_hash_cpu.cpp``, ``cuda/fiited_hash_cuda.cu``)
take over; ``ops/dispatch.py`` picks the implementation. They take validated input
(``store.hash_table.ResidentHashTable`` checks it): 1-D contiguous tensors, no ``EMPTY_KEY`` key,
no NaN score.

Insert rule (deterministic, independent of thread count and of the order of the batch):
    1. Equal keys of the batch are one key; its score is the maximum of their scores.
    2. A key already resident keeps its slot and its score, and is *pinned*: no key of the
       same batch evicts it.
    3. The missing keys of a bucket are placed one by one in the order (score descending, key
       ascending). Each takes the bucket's lowest free slot; when there is none, it replaces the
       minimum-score victim (ties: lowest slot) if its score is strictly higher, else it is
       refused (slot -1). Victims are the residents that are neither pinned nor inserted by this
       batch, so a key of the batch never evicts another one.
    Evicted keys are returned in ascending order of their slot (which the new key now holds).
"""

from typing import Tuple

import torch

EMPTY_KEY = -(2**63)  # int64 min: the key of a free slot; refused as an input key
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 finalizer constants, as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` by ``s`` bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(keys: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer of int64 [n] (wrapping int64 products = uint64 arithmetic)."""
    z = (keys ^ _shr(keys, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def bucket_of(keys: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket int64 [n] in [0, num_buckets) of keys int64 [n]: ``(mix64(k) >> 32) * nb >> 32``.

    The high 32 bits of the mix scaled to the range (Lemire's multiply-shift), so any
    num_buckets <= 2^31 works, not only powers of two; the product stays below 2^63.
    """
    return (_shr(mix64(keys), 32) * num_buckets) >> 32


def lookup(table_keys: torch.Tensor, bucket_size: int, keys: torch.Tensor,
           missing: int = -1) -> torch.Tensor:
    """Slot int64 [n] of each key of keys int64 [n], ``missing`` where it is not resident.
    Read-only."""
    num_buckets = table_keys.numel() // bucket_size
    buckets = bucket_of(keys, num_buckets)
    hit = table_keys.view(num_buckets, bucket_size)[buckets] == keys.unsqueeze(1)  # [n, W]
    found = hit.any(1)
    local = hit.to(torch.uint8).argmax(1)
    return torch.where(found, buckets * bucket_size + local, torch.full_like(buckets, missing))


def insert(
    table_keys: torch.Tensor,
    table_scores: torch.Tensor,
    bucket_size: int,
    keys: torch.Tensor,
    scores: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert the missing keys by the module's rule, in place.

    Args:
        table_keys: int64 [S], updated.
        table_scores: fp32 [S], updated at the slots that take a new key.
        bucket_size: W, slots per bucket.
        keys: int64 [n], any order, duplicates allowed.
        scores: fp32 [n], the score of each key.

    Returns:
        (slots int64 [n] (-1 = refused), evicted_keys int64 [v], evicted_slots int64 [v]),
        the evictions in ascending slot order.
    """
    W, S = bucket_size, table_keys.numel()
    nb = S // W
    empty_long = keys.new_empty(0)
    if keys.numel() == 0:
        return keys.new_full((0,), -1), empty_long, empty_long.clone()
    # 1. Dedupe: one score (the max) per key.
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    uscore = scores.new_full(uniq.shape, float("-inf")).scatter_reduce(
        0, inverse, scores, "amax", include_self=False)
    uslot = lookup(table_keys, W, uniq)
    # 2. Pin the residents of the batch.
    pinned = torch.zeros(S, dtype=torch.bool, device=keys.device)
    pinned[uslot[uslot >= 0]] = True
    # 3. Missing keys in (bucket asc, score desc, key asc) order; uniq is key-ascending.
    miss = (uslot < 0).nonzero().squeeze(1)
    if miss.numel() == 0:
        return uslot[inverse], empty_long, empty_long.clone()
    cb = bucket_of(uniq[miss], nb)
    order = torch.sort(-uscore[miss], stable=True).indices
    order = order[torch.sort(cb[order], stable=True).indices]
    miss, cb = miss[order], cb[order]
    ck, cs = uniq[miss], uscore[miss]
    ub, counts = torch.unique_consecutive(cb, return_counts=True)
    group = torch.repeat_interleave(torch.arange(ub.numel(), device=keys.device), counts)
    rank = torch.arange(cb.numel(), device=keys.device) - (counts.cumsum(0) - counts)[group]
    # Per touched bucket: free slots in slot order, victims in (score, slot) order.
    bk = table_keys.view(nb, W)[ub]
    bs = table_scores.view(nb, W)[ub]
    free = bk == EMPTY_KEY
    victim = ~free & ~pinned.view(nb, W)[ub]
    free_order = torch.sort((~free).to(torch.uint8), dim=1, stable=True).indices
    by_score = torch.sort(bs, dim=1, stable=True).indices
    victim_order = by_score.gather(
        1, torch.sort((~victim.gather(1, by_score)).to(torch.uint8), dim=1, stable=True).indices)
    n_free, n_victim = free.sum(1)[group], victim.sum(1)[group]
    takes_free = rank < n_free
    j = rank - n_free  # the j-th weakest victim is the minimum when this key's turn comes
    victim_local = victim_order[group, j.clamp(0, W - 1)]
    evicts = ~takes_free & (j < n_victim) & (cs > bs[group, victim_local])
    local = torch.where(takes_free, free_order[group, rank.clamp(max=W - 1)], victim_local)
    slot = ub[group] * W + local
    accepted = takes_free | evicts
    evicted_slots = slot[evicts].sort().values
    evicted_keys = table_keys[evicted_slots]
    placed = slot[accepted]
    table_keys[placed] = ck[accepted]
    table_scores[placed] = cs[accepted]
    uslot[miss[accepted]] = placed
    return uslot[inverse], evicted_keys, evicted_slots


def erase(table_keys: torch.Tensor, table_scores: torch.Tensor, bucket_size: int,
          keys: torch.Tensor) -> int:
    """Free the slots of the resident keys among keys int64 [n]; returns how many were freed.

    A freed slot gets ``EMPTY_KEY`` and score 0. No tombstone is needed: probing never leaves a
    key's bucket and lookup scans the whole bucket, so a hole cannot hide a key behind it.
    """
    slots = lookup(table_keys, bucket_size, torch.unique(keys))
    slots = slots[slots >= 0]
    table_keys[slots] = EMPTY_KEY
    table_scores[slots] = 0.0
    return int(slots.numel())
