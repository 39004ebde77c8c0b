"""The training app on 2 processes (gloo on CPU): torchrun, kill-and-resume, torchx, bad input.

Every test launches real processes on tiny synthetic data (23 steps of 2 x 128 examples).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)
TINY = [
    "dataset.num_train=6000", "dataset.num_test=2000", "dataset.cardinality_scale=0.01",
    "train.batch_size=256", "train.test_batch_size=1000", "train.progress=false",
]
FIITED_CYCLES = ["emb.prune_interval=6"]  # pruning cycles before and after the checkpoint


def _fiited_sharder_missing() -> bool:
    try:
        from torchrec_fiited.distributed import FiitedEmbeddingBagCollectionSharder  # noqa: F401
    except ImportError:
        return True
    return False


needs_fiited_sharder = pytest.mark.skipif(
    _fiited_sharder_missing(),
    reason="torchrec_fiited.distributed.FiitedEmbeddingBagCollectionSharder is not importable yet",
)
EMBS = ["full", pytest.param("fiited", marks=needs_fiited_sharder)]


def _env():
    # One thread per process: 2 processes on a 2-core machine.
    return {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}


def _torchrun(out_dir, emb, *overrides, timeout=180):
    extra = FIITED_CYCLES if emb == "fiited" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "torchrec_fiited.train", f"hydra.run.dir={out_dir}", f"emb={emb}", *TINY,
           *extra, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def _check_two_process_metrics(m, emb):
    assert m["world_size"] == 2 and m["emb"] == emb
    assert m["steps"] == 23  # 6000 // 256: the short last global batch is dropped
    assert m["test_examples"] == 2000  # every test example scored once over both ranks
    assert 0.6 < m["test_auc"] <= 1.0, m["test_auc"]
    assert len(m["train_losses"]) == len(m["train_losses_global"]) == 23
    assert len(m["sharding_plan"]) == 26
    assert {r for t in m["sharding_plan"].values() for r in t["ranks"]} == {0, 1}
    if emb == "fiited":
        assert m["embedding_bytes"] < 0.8 * m["embedding_bytes_full"]


@pytest.mark.parametrize("emb, sharding_type", [
    ("full", "table_wise"),
    pytest.param("fiited", None, marks=needs_fiited_sharder),
])
def test_torchrun_two_processes_write_metrics(emb, sharding_type, tmp_path):
    proc = _torchrun(tmp_path, emb, f"train.sharding_type={sharding_type or 'null'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"emb={emb} budget=0.25 dataset=synthetic AUC=" in proc.stdout
    m = _metrics(tmp_path)
    _check_two_process_metrics(m, emb)
    if sharding_type:
        assert {t["sharding_type"] for t in m["sharding_plan"].values()} == {sharding_type}


# FIITED only: its run checkpoints the dense model, optimizer and data position as emb=full's
# does, plus the sharded store (emb=full's kill-and-resume is the one-process test's; 38 s here).
@pytest.mark.parametrize("emb", EMBS[1:])
def test_killed_and_resumed_run_repeats_the_uninterrupted_one(emb, tmp_path):
    epochs = ["train.epochs=2", "train.shuffle=true"]  # 23 steps an epoch, a new order in each
    whole = _torchrun(tmp_path / "whole", emb, *epochs)
    assert whole.returncode == 0, whole.stderr[-4000:]
    run = tmp_path / "run"
    # Checkpoints at 10 and 20 (only the newest kept); step 21 is lost with the "kill".
    killed = _torchrun(run, emb, *epochs, "train.checkpoint_every=10", "train.stop_after_steps=21")
    assert killed.returncode == 0, killed.stderr[-4000:]
    assert "stopped after step 21" in killed.stdout
    assert not (run / "metrics.json").exists()
    assert os.listdir(run / "checkpoints") == ["step_000000020"]
    resumed = _torchrun(run, emb, *epochs, "train.checkpoint_every=10", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _metrics(tmp_path / "whole"), _metrics(run)
    assert b["resumed_from_step"] == 20 and a["steps"] == b["steps"] == 46
    assert b["train_losses"] == a["train_losses"]  # rank 0's, bit for bit
    assert b["train_losses_global"] == a["train_losses_global"]
    assert b["test_auc"] == a["test_auc"]


def test_torchx_local_cwd_trains_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           "launchers/components.py:train", "--nproc_per_node", "2", "--",
           f"hydra.run.dir={out}", "emb=full", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("local_cwd://torchx/torchrec_fiited-")
    _check_two_process_metrics(_metrics(out), "full")


@pytest.mark.parametrize("emb, overrides, message", [
    ("full", ["train.batch_size=255"], "train.batch_size=255 must be divisible by the world size 2"),
    ("mixed_dim", [], "emb=mixed_dim does not run distributed"),
])
def test_bad_distributed_input_fails_with_a_clear_error(emb, overrides, message, tmp_path):
    proc = _torchrun(tmp_path, emb, *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr


@needs_fiited_sharder
def test_a_two_process_fiited_checkpoint_resumes_in_one_process(tmp_path):
    # FIITED's sparse state reshards (distributed/reshard.py): the 2-process row-wise pools go
    # into the one process's pool, the dense model and the data position carry over.
    run = tmp_path / "run"
    killed = _torchrun(run, "fiited", "train.checkpoint_every=10", "train.stop_after_steps=11")
    assert killed.returncode == 0, killed.stderr[-4000:]
    cmd = [sys.executable, "-m", "torchrec_fiited.train", f"hydra.run.dir={run}", "emb=fiited",
           *TINY, *FIITED_CYCLES, "train.checkpoint_every=10", "train.resume=true"]
    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "from 2 to 1 processes" in resumed.stderr + resumed.stdout
    m = _metrics(run)
    assert m["world_size"] == 1 and m["resumed_from_step"] == 10 and m["steps"] == 24
    whole = tmp_path / "whole"  # the same job in one process from the start
    proc = subprocess.run([c if not c.startswith("hydra.run.dir=") else f"hydra.run.dir={whole}"
                           for c in cmd if c != "train.resume=true"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Measured 0.7347 vs 0.7330; without the FIITED state loaded 0.7086.
    assert abs(m["test_auc"] - _metrics(whole)["test_auc"]) < 0.01
    assert m["embedding_bytes"] <= 0.25 * m["embedding_bytes_full"]
