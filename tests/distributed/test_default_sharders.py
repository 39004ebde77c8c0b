"""DMP given torchrec's default sharders (no FIITED sharder) leaves a FiitedEmbeddingBagCollection
unsharded on every rank; its first training forward refuses, naming the fix (issue 13). The
proper sharders are covered by test_dmp.py."""

from tests.distributed import cases
from tests.distributed.harness import run_ranks


def test_unsharded_collection_refuses_to_train_on_two_ranks():
    res = run_ranks(cases.default_sharders, 2)
    for rank, r in enumerate(res):
        assert r["unsharded"] == 1  # DMP really left it whole
        error = r["error"]
        assert error is not None and f"training unsharded on rank {rank} of 2" in error, error
        assert "sharders=torchrec_fiited.fiited_sharders()" in error and "allow_replicated" in error
        assert r["steps_after_error"] == 0  # refused before the store was touched
        assert r["eval_logits"].shape == (cases.GLOBAL_BATCH // 2, 1)  # reading is harmless
        assert r["steps_replicated"] == 1  # the explicit opt-out trains


def test_one_rank_process_group_trains_unsharded():
    # Nothing to drift from: a group of one trains the collection as one process does.
    assert run_ranks(cases.plain_training_step, 1) == [1]
