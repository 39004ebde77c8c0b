"""The pruning methods share one cadence: every FIITED-family config (and ITEP's) takes the app's
default interval, a fraction of the epoch, which fiited_config turns into steps."""

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from torchrec_fiited.app.embeddings import EmbeddingSpec, fiited_config

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))
PRUNING = ["fiited", "fiited_dynamic", "fiited_2d", "adaembed", "itep"]


def _spec(emb: str, *overrides: str) -> EmbeddingSpec:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"emb={emb}", *overrides])
    return EmbeddingSpec(**OmegaConf.to_container(cfg.emb, resolve=True))


@pytest.mark.parametrize("emb", PRUNING)
def test_every_pruning_method_takes_the_default_interval(emb):
    spec = _spec(emb)
    assert spec.prune_interval is None
    assert spec.prune_interval_fraction == EmbeddingSpec.prune_interval_fraction == 0.05
    # 20 cycles an epoch, at least one step apart, whatever the epoch's length.
    for steps, want in [(245, 12), (490, 24), (22_000, 1100), (10, 1)]:
        cfg = fiited_config(spec, budget=0.1, lr=0.01, eps=1e-8, steps_per_epoch=steps, seed=0)
        assert cfg.prune_interval == want


def test_an_explicit_interval_wins_over_the_fraction():
    spec = _spec("fiited", "emb.prune_interval=7")
    cfg = fiited_config(spec, budget=0.1, lr=0.01, eps=1e-8, steps_per_epoch=245, seed=0)
    assert cfg.prune_interval == 7
