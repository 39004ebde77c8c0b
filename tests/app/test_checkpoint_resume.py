"""Checkpoint and resume of the training app in one process (the 2-process runs are in
test_distributed_app.py): a killed-and-resumed run repeats an uninterrupted one exactly."""

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from torchrec_fiited.app.checkpoint import Checkpointer
from torchrec_fiited.app.parallel import DistEnv
from torchrec_fiited.app.recipe import TrainRecipe

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
TINY = [
    "dataset.num_train=3000", "dataset.num_test=1000", "dataset.cardinality_scale=0.01",
    "train.batch_size=256", "train.test_batch_size=1000", "train.progress=false",
    "train.epochs=2", "train.shuffle=true",
]
FIITED_CYCLES = ["emb.prune_interval=4"]  # cycles before and after the checkpoint
# FIITED-2D shrinks its pools at step 6, so the checkpoint at 10 holds the narrower ones.
DIM_PRUNING = ["emb.prune_interval=4", "+emb.fiited.dim_pruning.cold_start_steps=6"]


def _run(emb, out_dir, *extra):
    extra_for = {"fiited": FIITED_CYCLES, "fiited_2d": DIM_PRUNING}
    overrides = [f"emb={emb}", *TINY, *extra_for.get(emb, []), *extra]
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["emb_name"] = emb
    return TrainRecipe(plain, str(out_dir)).run()


@pytest.mark.parametrize("emb", ["full", "fiited", "fiited_2d"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_one(emb, tmp_path):
    whole = _run(emb, tmp_path / "whole")
    # 12 steps an epoch: the checkpoint at 10 is in epoch 0, step 11 is lost, epoch 1 follows.
    stopped = _run(emb, tmp_path / "run", "train.checkpoint_every=5", "train.stop_after_steps=11")
    assert stopped == {"stopped_at_step": 11}
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_000000010"]
    resumed = _run(emb, tmp_path / "run", "train.checkpoint_every=5", "train.resume=true")
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == whole["steps"] == 24
    assert resumed["train_losses"] == whole["train_losses"]
    assert resumed["test_auc"] == whole["test_auc"]
    assert resumed["chunk_allocation"] == whole["chunk_allocation"]


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    _run("full", tmp_path, "train.checkpoint_every=5", "train.stop_after_steps=5")
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run .*"
                                         r"pass train.resume=true"):
        _run("full", tmp_path, "train.checkpoint_every=5")


def test_resume_rejects_another_setup_naming_both_values(tmp_path):
    _run("full", tmp_path, "train.checkpoint_every=5", "train.stop_after_steps=5")
    with pytest.raises(ValueError, match=r"made by another setup \(checkpoint vs this run\): "
                                         r"batch_size: 256 vs 128"):
        _run("full", tmp_path, "train.resume=true", "train.batch_size=128")


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    m = _run("full", tmp_path, "train.resume=true", "train.steps=3")
    assert m["resumed_from_step"] is None and m["steps"] == 3


def test_half_written_checkpoint_is_never_picked(tmp_path):
    ckpt = Checkpointer(str(tmp_path), DistEnv())
    ckpt.save(5, {"x": {"a": 1}}, {"run": "r"})
    os.makedirs(tmp_path / "step_000000010.tmp")  # a save that died before its rename
    assert ckpt.latest() == str(tmp_path / "step_000000005")
    ckpt.save(15, {"x": {"a": 2}}, {"run": "r"})  # the older complete one goes only now
    assert [s for s, _ in ckpt.complete()] == [15]
    state = {"x": {"a": 0}}
    ckpt.load(ckpt.latest(), state)
    assert state == {"x": {"a": 2}}
