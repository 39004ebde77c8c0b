"""The utility decay the app derives from the budget (``decay_for_budget``) when a FIITED-family
config leaves it null: short memory where slots are scarce, long memory where the budget holds
most ids, the half-life interpolated between; an explicit decay wins."""

import math

import pytest

from tests.app.test_prune_interval import _spec
from torchrec_fiited.app.embeddings import fiited_config
from torchrec_fiited.config import decay_for_budget
from torchrec_fiited.config.fiited_config import LONG_MEMORY, SHORT_MEMORY


def _half_life(gamma: float) -> float:
    return math.log(0.5) / math.log(gamma)


def test_decay_follows_the_budget():
    assert decay_for_budget(1.0) == decay_for_budget(0.01) == LONG_MEMORY[1] == 0.999
    assert decay_for_budget(0.001) == decay_for_budget(1e-5) == SHORT_MEMORY[1] == 0.98
    budgets = [0.001, 0.0015, 0.002, 0.003, 0.005, 0.007, 0.01]
    lives = [_half_life(decay_for_budget(b)) for b in budgets]
    assert lives == sorted(lives) and len(set(lives)) == len(lives)  # strictly longer memory
    # Geometric in the budget: the half-life at the middle (in log space) is the geometric mean.
    mid = math.sqrt(SHORT_MEMORY[0] * LONG_MEMORY[0])
    assert _half_life(decay_for_budget(mid)) == pytest.approx(
        math.sqrt(_half_life(0.98) * _half_life(0.999)))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget"):
            decay_for_budget(bad)


@pytest.mark.parametrize("emb", ["fiited", "fiited_dynamic", "fiited_2d", "adaembed"])
def test_methods_take_the_budgets_decay(emb):
    spec = _spec(emb)
    assert spec.fiited["decay"] is None
    for budget in (0.25, 0.01, 0.003, 0.001):
        cfg = fiited_config(spec, budget=budget, lr=0.01, eps=1e-8, steps_per_epoch=245, seed=0)
        assert cfg.decay == decay_for_budget(budget)


def test_an_explicit_decay_wins():
    spec = _spec("fiited", "emb.fiited.decay=0.95")
    cfg = fiited_config(spec, budget=0.1, lr=0.01, eps=1e-8, steps_per_epoch=245, seed=0)
    assert cfg.decay == 0.95
    # ITEP's baseline keeps its own fixed decay (TorchRec's ITEP decays access counts).
    itep = fiited_config(_spec("itep"), budget=0.1, lr=0.01, eps=1e-8, steps_per_epoch=245, seed=0)
    assert itep.decay == 0.98
