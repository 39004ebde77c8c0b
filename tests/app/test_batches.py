"""Per-rank batch slicing: the ranks together see exactly the single-process batches."""

import numpy as np
import pytest
import torch

from torchrec_fiited.app.batches import TrainBatches, eval_batches
from torchrec_fiited.data.common import CTRArrays

NAMES = ["c0", "c1"]


def _arrays(n: int) -> CTRArrays:
    rows = np.arange(n)
    return CTRArrays(dense=rows[:, None].astype(np.float32), sparse=np.stack([rows, rows + 1000], 1),
                     labels=(rows % 2).astype(np.float32))


def _ids(batch) -> list:
    return batch.dense_features[:, 0].long().tolist()


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_slices_concatenate_to_the_global_batch(shuffle):
    data = _arrays(19)
    one = TrainBatches(data, NAMES, batch_size=8, shuffle=shuffle, seed=3, drop_last=True)
    ranks = [TrainBatches(data, NAMES, batch_size=8, rank=r, world_size=2, shuffle=shuffle, seed=3)
             for r in range(2)]
    assert len(one) == len(ranks[0]) == 2  # the short last batch (3 rows) is dropped
    for epoch in range(2):
        for whole, r0, r1 in zip(one.epoch(epoch), ranks[0].epoch(epoch), ranks[1].epoch(epoch)):
            assert _ids(whole) == _ids(r0) + _ids(r1)
            assert r0.sparse_features.stride() == 4
            assert r0.sparse_features["c1"].values().tolist() == [i + 1000 for i in _ids(r0)]


def test_epoch_order_is_seeded_per_epoch_and_resumable():
    data = _arrays(40)
    batches = TrainBatches(data, NAMES, batch_size=8, shuffle=True, seed=0)
    first = [_ids(b) for b in batches.epoch(0)]
    assert first != [_ids(b) for b in batches.epoch(1)]
    assert first == [_ids(b) for b in batches.epoch(0)]
    assert [_ids(b) for b in batches.epoch(0, start=3)] == first[3:]
    assert sorted(sum(first, [])) == list(range(40))


def test_single_process_keeps_a_short_last_batch():
    batches = TrainBatches(_arrays(19), NAMES, batch_size=8)
    assert [len(_ids(b)) for b in batches.epoch(0)] == [8, 8, 3]


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(ValueError, match=r"train.batch_size=9 must be divisible by the world size 2 "
                                         r".*use e.g. train.batch_size=8"):
        TrainBatches(_arrays(19), NAMES, batch_size=9, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_score_every_example_once_with_equal_shapes(world_size):
    data = _arrays(23)
    per_rank = [list(eval_batches(data, NAMES, 10, rank=r, world_size=world_size))
                for r in range(world_size)]
    real = []
    for step in zip(*per_rank):
        assert len({b.labels.numel() for b, _ in step}) == 1  # same shape on every rank
        real += [i for b, valid in step for i in _ids(b)[:valid]]
    assert sorted(real) == list(range(23))
    assert all(isinstance(b.labels, torch.Tensor) for b, _ in per_rank[0])
