"""emb=hash / qr / freq_oracle through the app: Hydra config, training counts, bytes, refusals."""

import os

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from torchrec_fiited.app.embeddings import (
    SINGLE_PROCESS_METHODS, EmbeddingSpec, build_embeddings, embedding_bytes,
)
from torchrec_fiited.app.model import full_embeddings
from torchrec_fiited.app.recipe import TrainRecipe
from torchrec_fiited.baselines import (
    FreqOracleEmbeddingBagCollection, HashedEmbeddingBagCollection, QREmbeddingBagCollection,
)
from tests.conftest import make_tables

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
TINY = [
    "dataset.num_train=3000", "dataset.num_test=1000", "dataset.cardinality_scale=0.01",
    "train.batch_size=256", "train.test_batch_size=1000", "train.progress=false", "train.steps=4",
]
CLASSES = {"hash": HashedEmbeddingBagCollection, "qr": QREmbeddingBagCollection,
           "freq_oracle": FreqOracleEmbeddingBagCollection}


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_build_embeddings_makes_each_baseline(method):
    tables = make_tables(rows=400)
    counts = {f: np.ones(t.num_embeddings, dtype=np.int64) for t in tables for f in t.feature_names}
    module = build_embeddings(EmbeddingSpec(method=method), tables, 0.25, 0.05, 1e-8, 10, 0,
                              counts=counts)
    assert isinstance(module, CLASSES[method])
    assert method in SINGLE_PROCESS_METHODS  # the recipe refuses them under torchrun
    # Measured like emb=full: its bytes are E * (D + 1) * 4 (weights plus row-wise Adagrad).
    full = embedding_bytes(full_embeddings(tables, 0.05, 1e-8))
    assert full == sum(t.num_embeddings * (t.embedding_dim + 1) * 4 for t in tables)
    assert 0.2 * full <= embedding_bytes(module) <= 0.25 * full


def test_freq_oracle_without_counts_says_so():
    with pytest.raises(ValueError, match="emb=freq_oracle needs the training counts"):
        build_embeddings(EmbeddingSpec(method="freq_oracle"), make_tables(), 0.25, 0.05, 1e-8, 10, 0)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_recipe_trains_each_baseline(method, tmp_path):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"emb={method}", "budget=0.3", *TINY])
    plain = OmegaConf.to_container(cfg, resolve=True)
    recipe = TrainRecipe(plain, str(tmp_path))
    m = recipe.run()
    assert isinstance(recipe.embeddings, CLASSES[method])
    assert m["steps"] == 4 and np.isfinite(m["final_train_loss"])
    assert 0.0 < m["embedding_bytes"] <= 0.3 * m["embedding_bytes_full"] * 1.01


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_recipe_refuses_baselines_in_distributed_runs(method, tmp_path, monkeypatch):
    from torchrec_fiited.app import parallel

    # NOTE: a faked two-process env; the guard runs before any process group is used.
    monkeypatch.setattr(parallel, "init_distributed", lambda: parallel.DistEnv(rank=0, world_size=2))
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"emb={method}", *TINY])
    recipe = TrainRecipe(OmegaConf.to_container(cfg, resolve=True), str(tmp_path))
    with pytest.raises(ValueError, match=rf"emb={method} does not run distributed .* single process"):
        recipe.setup()
