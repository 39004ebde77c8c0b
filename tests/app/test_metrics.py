"""Tests of EvalMetrics against values computed by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_fiited.app.metrics import EvalMetrics, base_entropy, compute_metrics


def test_auc_of_four_points() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs ranked right: (0.35>0.1),
    # (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4
    out = compute_metrics(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert out["auc"] == pytest.approx(0.75)


def test_auc_counts_ties_as_half() -> None:
    out = compute_metrics(torch.tensor([0.3, 0.3, 0.9]), torch.tensor([0, 1, 1]))
    assert out["auc"] == pytest.approx(0.75)  # (0.5 for the tie + 1) / 2


def test_logloss_and_ne_of_two_points() -> None:
    out = compute_metrics(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]))
    logloss = -(math.log(0.9) + math.log(0.8)) / 2  # 0.164252
    assert out["logloss"] == pytest.approx(logloss, rel=1e-6)  # float32 inputs
    assert out["ne"] == pytest.approx(logloss / math.log(2.0), rel=1e-6)  # CTR 0.5: H = ln 2
    assert out["accuracy"] == 1.0


def test_ne_uses_base_ctr_entropy() -> None:
    preds = torch.tensor([0.25, 0.25, 0.25, 0.25])
    out = compute_metrics(preds, torch.tensor([1, 0, 0, 0]))
    # predicting the base CTR 0.25 everywhere: logloss == entropy, NE == 1
    assert out["ne"] == pytest.approx(1.0, rel=1e-9)
    assert base_entropy(0.25) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_accuracy_threshold_half() -> None:
    out = compute_metrics(torch.tensor([0.6, 0.4, 0.7, 0.1]), torch.tensor([1, 1, 0, 0]))
    assert out["accuracy"] == pytest.approx(0.5)


def test_logits_mode_matches_probabilities() -> None:
    logits = torch.tensor([-2.0, 0.5, 1.5, -0.1])
    labels = torch.tensor([0, 1, 1, 1])
    a = compute_metrics(logits, labels, from_logits=True)
    b = compute_metrics(torch.sigmoid(logits), labels)
    assert a == pytest.approx(b)
    assert a["accuracy"] == pytest.approx(0.75)


def test_streaming_equals_one_shot_and_reset() -> None:
    gen = torch.Generator().manual_seed(0)
    preds = torch.rand(1000, generator=gen)
    labels = (torch.rand(1000, generator=gen) < preds).float()
    metrics = EvalMetrics()
    for chunk in range(0, 1000, 128):
        metrics.update(preds[chunk:chunk + 128].unsqueeze(1), labels[chunk:chunk + 128])
    assert metrics.count == 1000
    assert metrics.compute() == pytest.approx(compute_metrics(preds, labels))
    metrics.reset()
    with pytest.raises(ValueError, match="before any example"):
        metrics.compute()


def test_logloss_clips_confident_mistakes() -> None:
    out = compute_metrics(torch.tensor([0.0, 1.0]), torch.tensor([1, 1]), eps=1e-7)
    assert out["logloss"] == pytest.approx((-math.log(1e-7) - math.log(1 - 1e-7)) / 2)
    assert math.isnan(out["auc"]) and math.isnan(out["ne"])  # a single class


def test_bad_inputs() -> None:
    metrics = EvalMetrics()
    with pytest.raises(ValueError, match=r"probability 1.5 is outside \[0, 1\]; pass from_logits"):
        metrics.update(torch.tensor([0.5, 1.5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predictions have 3 elements but labels have 2"):
        metrics.update(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2.0"):
        metrics.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"eps must be in \(0, 0.5\)"):
        EvalMetrics(eps=0.0)
    assert metrics.count == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=2, max_size=30))
def test_auc_equals_pairwise_count(points) -> None:
    scores = [s / 20 for s, _ in points]
    labels = [int(y) for _, y in points]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    out = compute_metrics(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    if not pos or not neg:
        assert math.isnan(out["auc"])
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert out["auc"] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-6)
