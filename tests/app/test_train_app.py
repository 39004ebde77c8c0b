"""The training app end to end: the real CLI once, every emb= choice through Hydra compose."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from torchrec_fiited.app.recipe import TrainRecipe

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
TINY = [
    "dataset.num_train=6000", "dataset.num_test=2000", "dataset.cardinality_scale=0.01",
    "train.batch_size=256", "train.test_batch_size=1000", "train.progress=false",
]
REQUIRED = {
    "test_auc", "test_accuracy", "test_logloss", "test_ne", "embedding_bytes",
    "embedding_bytes_full", "budget", "emb", "dataset", "steps", "train_seconds",
    "examples_per_second",
}


def _run(emb: str, tmp_path, extra=()):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"emb={emb}", *TINY, *extra])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["emb_name"] = emb
    return TrainRecipe(plain, str(tmp_path)).run()


@pytest.mark.parametrize("emb", ["full", "fiited", "fiited_dynamic", "adaembed", "itep", "mixed_dim"])
def test_every_method_trains_and_reports(emb, tmp_path):
    # NOTE: on these tiny tables Mixed-Dimension's projections alone take 26% of the full bytes.
    m = _run(emb, tmp_path, ["budget=0.5"] if emb == "mixed_dim" else [])
    assert REQUIRED <= set(m)
    assert m["emb"] == emb and m["steps"] == 24
    assert 0.55 < m["test_auc"] <= 1.0, m
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["test_auc"] == m["test_auc"]
    if emb != "full":
        # A method that ignored its budget would hold at least the full tables (plus its own
        # metadata); at these budgets every method holds 0.45-0.6 of them.
        assert m["embedding_bytes"] < m["embedding_bytes_full"]


def test_fiited_records_allocation_and_respects_budget(tmp_path):
    m = _run("fiited", tmp_path, ["emb.prune_interval=6"])
    assert [s["step"] for s in m["chunk_allocation"]] == [6, 12, 18, 24]
    snapshot = m["chunk_allocation"][-1]["tables"]
    assert all(len(rows) == 3 for rows in snapshot.values())  # K=2: rows with 0, 1, 2 live chunks
    stats = m["fiited_stats"]
    assert stats["bytes"]["total"] == m["embedding_bytes"]
    # Every byte counts (store v2): the module holds at most 0.25 of the full bytes (fp32 weights
    # plus rowwise Adagrad state) and wastes less than one chunk slot and one bucket of entries per
    # pool; the chunk bytes are the pools' slots.
    full = m["embedding_bytes_full"]
    assert stats["bytes_full"] == full
    pool_floats = sum(p["capacity"] * p["chunk_size"] for p in stats["pools"].values())
    assert stats["bytes"]["chunks"] == 4 * pool_floats
    slack = sum(4 * p["chunk_size"] + 8 + 32 * (8 * 2 + 16) for p in stats["pools"].values())
    assert 0.25 * full - slack < m["embedding_bytes"] <= 0.25 * full


def test_bad_budget_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1.5"):
        _run("fiited", tmp_path, ["budget=1.5"])


def test_cli_writes_metrics_json(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torchrec_fiited.train", f"hydra.run.dir={out}", "emb=fiited", *TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "emb=fiited budget=0.25 dataset=synthetic AUC=" in proc.stdout
    with open(out / "metrics.json") as f:
        assert REQUIRED <= set(json.load(f))


def test_unreachable_mixed_dim_budget_is_recorded_not_raised(tmp_path):
    m = _run("mixed_dim", tmp_path, ["budget=0.02"])
    assert "below what mixed-dimension embeddings can reach" in m["infeasible"]
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["infeasible"] == m["infeasible"]
