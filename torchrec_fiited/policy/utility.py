"""Chunk utility u = gamma * u + a * g, with the decay applied lazily.

An entry table's utilities are stored against its base step (``store.EntryTable``): the true
utility at step t is u * gamma ** (t - base), and an addition at step t is scaled by
gamma ** (base - t). That is exact, a training step only touches the entries in its batch (no
O(table) decay pass), and no entry keeps a step of its own (4 bytes each).
"""

from typing import Optional

import torch

from torchrec_fiited.ops import FusedParams, fused_backward
from torchrec_fiited.store.chunk_pool import OPTIMIZER_STATE_SHAPES


def missed_gains(
    grad_rows: torch.Tensor,
    row_of_id: torch.Tensor,
    id_scale: Optional[torch.Tensor],
    groups: torch.Tensor,
    gains: torch.Tensor,
    params: FusedParams,
) -> None:
    """Add to ``gains`` fp32 [G, K] what the ids without an entry earn, grouped by key.

    Id i belongs to group ``groups[i]`` (int64 [n], in [0, G): one group per distinct key; -1
    for an id that has an entry, which is skipped) and
    its gradient is ``id_scale[i] * grad_rows[row_of_id[i]]``, as in ``ops.fused_backward``. It
    *is* the fused backward's miss groups over an empty entry table: a group earns exactly what
    an entry with every chunk pruned would (repeated ids summed, a = their count), by the same
    kernel, and nothing is written but ``gains``. (The collection passes its misses to the
    same call as its entries instead.)
    """
    G, K = gains.shape
    if groups.numel() == 0 or G == 0:
        return
    cs = grad_rows.shape[1] // K
    no_entries = torch.empty(0, K, dtype=torch.int32, device=gains.device)
    no_utilities = gains.new_empty(0, K)
    no_weights = grad_rows.new_empty(0, cs)
    no_state = grad_rows.new_zeros(OPTIMIZER_STATE_SHAPES[params.optimizer](0, cs))
    fused_backward(grad_rows, row_of_id, id_scale, groups, no_entries, no_utilities, no_weights,
                   no_state, params, miss_utilities=gains)


def record_missed_utilities(sketch, keys: torch.Tensor, grads: torch.Tensor, params) -> None:
    """Add a * ||g_chunk|| of non-resident ``keys`` (int64 [n]) to ``sketch``.

    ``grads`` fp32 [n, D_stored] are the ids' gradients at the zero rows they read; repeated
    keys are summed first and a is their count (``missed_gains``), so a key scores in the
    sketch exactly what it would score as an entry with every chunk pruned.
    """
    if sketch.width == 0 or keys.numel() == 0:
        return
    unique, groups = torch.unique(keys, return_inverse=True)
    gains = torch.zeros(unique.numel(), sketch.num_chunks, device=grads.device)
    rows = torch.arange(keys.numel(), device=keys.device)
    missed_gains(grads, rows, None, groups, gains, params)
    sketch.add(unique, gains)
