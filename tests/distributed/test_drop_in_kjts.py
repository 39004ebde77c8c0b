"""The sharded collection takes the KJTs the unsharded one takes: other modules' keys are
dropped before routing (as torchrec's ShardedEmbeddingBagCollection drops them), and a VBE KJT
with inverse indices trains as its padded batch. 2 gloo ranks."""

import pytest
import torch

from tests.distributed import cases
from tests.distributed.harness import run_ranks


@pytest.mark.parametrize("kind", ["row_wise"])
def test_other_keys_and_vbe_train_as_the_plain_batches(kind):
    res = run_ranks(cases.drop_in_kjts, 2, kind)
    for r in res:
        assert r["plain"]["steps"] == 4
        for other, base in (("other_keys", "plain"), ("vbe", "padded")):
            torch.testing.assert_close(r[other]["outputs"], r[base]["outputs"], rtol=0, atol=0)
            if r[base]["state"] is not None:  # gathered on rank 0
                assert r[other]["state"].keys() == r[base]["state"].keys()
                for key, want in r[base]["state"].items():
                    torch.testing.assert_close(r[other]["state"][key], want, rtol=0, atol=0)
        error = r["bare_vbe_error"]
        assert error is not None and "VBE" in error and "needs inverse_indices" in error, error
    # The runs really trained and differ from each other's batches.
    assert not torch.equal(res[0]["plain"]["outputs"], res[0]["padded"]["outputs"])
