"""Variable batch per feature (VBE): a feature's own bags, expanded to the output's batch.

A VBE KJT holds B_f bags of feature f (``stride_per_key``) and ``inverse_indices`` [F, B] naming,
for each of the B output rows, the bag of f it reads. FIITED pools a VBE batch as its padded
equivalent: row b of f gets bag ``inverse[f, b]`` (ids, and weights, repeated), so a VBE batch
gives the same pooled outputs, and trains exactly as, the batch with every bag written out.

Example::

    # f0 has 2 bags [[1, 2], [3]]; inverse [0, 1, 0]: the output rows read bags 0, 1, 0
    values, offsets, _ = expand_bags(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]), None,
                                     torch.tensor([0, 1, 0]))
    values   # tensor([1, 2, 3, 1, 2])
    offsets  # tensor([0, 2, 3, 5])
"""

from typing import Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def expand_bags(
    values: torch.Tensor,
    offsets: torch.Tensor,
    weights: Optional[torch.Tensor],
    inverse: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Bags ``inverse`` of one feature, in order.

    Args:
        values: ids [n] of the feature's B_f bags.
        offsets: int64 [B_f + 1] bag boundaries in ``values``.
        weights: per-id weights [n] or None.
        inverse: int [B], the bag in [0, B_f) of every output row.

    Returns:
        (values [m], offsets int64 [B + 1], weights [m] or None) of the B expanded bags.

    Raises:
        ValueError: an inverse index outside [0, B_f).
    """
    num_bags = offsets.numel() - 1
    inverse = inverse.to(device=offsets.device, dtype=torch.int64)
    if inverse.numel() and (int(inverse.min()) < 0 or int(inverse.max()) >= num_bags):
        raise ValueError(
            f"inverse_indices must lie in [0, {num_bags}) (the feature's batch size), got "
            f"[{int(inverse.min())}, {int(inverse.max())}]"
        )
    starts = offsets[:-1][inverse]
    lengths = offsets[1:][inverse] - starts
    new_offsets = torch.zeros(inverse.numel() + 1, dtype=torch.int64, device=offsets.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    # Position of every output id in ``values``: its bag's start plus its rank within the bag.
    rank = torch.arange(int(new_offsets[-1]), device=offsets.device) - torch.repeat_interleave(
        new_offsets[:-1], lengths
    )
    index = torch.repeat_interleave(starts, lengths) + rank
    return values[index], new_offsets, None if weights is None else weights[index]


def inverse_rows(features: KeyedJaggedTensor) -> Optional[Dict[str, torch.Tensor]]:
    """A VBE KJT's inverse indices by feature (int [B] each), or None for a fixed batch."""
    if not features.variable_stride_per_key():
        return None
    keys, inverse = features.inverse_indices()
    return dict(zip(keys, inverse.unbind(0)))


def written_out(features: KeyedJaggedTensor, names: List[str]) -> KeyedJaggedTensor:
    """Features ``names`` of ``features`` as a fixed-batch KJT: other keys dropped, and a VBE
    batch's bags written out to its padded equivalent (row b of f gets bag ``inverse[f, b]``).

    The caller has checked the KJT (keys present, weights as expected, inverse indices for
    ``names`` when it is VBE: ``validation.check_kjt`` / ``vbe_batch_size``).
    """
    inverse = inverse_rows(features)
    per_key = features.to_dict()
    values, lengths, weights = [], [], []
    for name in names:
        jt = per_key[name]
        v, offsets, w = jt.values(), jt.offsets().to(torch.int64), jt.weights_or_none()
        if inverse is not None:
            v, offsets, w = expand_bags(v, offsets, w, inverse[name])
        values.append(v)
        lengths.append(offsets[1:] - offsets[:-1])
        if w is not None:
            weights.append(w)
    # A fixed batch keeps the KJT's own (inferred) stride; a written-out VBE batch has B rows.
    stride = None if inverse is None else int(inverse[names[0]].numel())
    return KeyedJaggedTensor(
        keys=names, values=torch.cat(values), lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights else None, stride=stride,
    )
