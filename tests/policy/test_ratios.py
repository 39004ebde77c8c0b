"""Acceptance 4 (manual): fitted per-chunk ratios."""

import pytest
import torch

from torchrec_fiited.policy import ManualRatioPolicy, fit_chunk_prune_ratios


@pytest.mark.parametrize("mean", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_paper_k8_settings(mean, exponent):
    ratios = fit_chunk_prune_ratios(8, mean, exponent, cap=0.95)
    assert all(a <= b for a, b in zip(ratios, ratios[1:])), ratios
    assert max(ratios) <= 0.95
    assert sum(ratios) / 8 == pytest.approx(mean, abs=1e-12)


def test_linear_fit_by_hand():
    # c * (0.25 + 0.75) = 2 * 0.5 -> c = 1.
    assert fit_chunk_prune_ratios(2, 0.5, 1.0, 0.95) == pytest.approx([0.25, 0.75])


def test_cap_refits_the_rest():
    # Linear fit at 70% gives 1.3125 for the last of 8 chunks; capped chunks are fixed at 0.95
    # and the others refitted, so the mean still holds.
    ratios = fit_chunk_prune_ratios(8, 0.7, 1.0, 0.95)
    assert ratios[4:] == [0.95] * 4
    assert ratios[:4] == pytest.approx([0.1125, 0.3375, 0.5625, 0.7875])


def test_at_90_percent_both_exponents_coincide():
    # The paper (section IV-D): at 90%, a = 0.5 and a = 1 yield the same ratios under the cap.
    assert fit_chunk_prune_ratios(8, 0.9, 0.5, 0.95) == pytest.approx(
        fit_chunk_prune_ratios(8, 0.9, 1.0, 0.95))


def test_mean_beyond_cap_saturates():
    assert fit_chunk_prune_ratios(4, 0.98, 1.0, 0.95) == [0.95] * 4


def test_keep_fractions_are_the_ratios_when_every_entry_is_seen():
    ratios = fit_chunk_prune_ratios(4, 0.75, 1.0, 0.95)
    policy = ManualRatioPolicy(ratios, enforce_ratio=0.0)
    rows = 1000
    keep = policy.keep_fractions(capacity=int(0.25 * rows * 4), num_seen=rows)
    torch.testing.assert_close(keep, torch.tensor([1 - r for r in ratios], dtype=torch.float64))


def test_keep_fractions_fill_the_pool_when_few_entries_are_seen():
    policy = ManualRatioPolicy([0.25, 0.75], enforce_ratio=0.0)
    keep = policy.keep_fractions(capacity=100, num_seen=60)
    # Shares 0.75 : 0.25 would ask chunk 0 for 75 > 60 live chunks; the excess goes to chunk 1.
    torch.testing.assert_close(keep * 60, torch.tensor([60.0, 40.0], dtype=torch.float64))


def test_admission_quotas_fill_the_pool():
    policy = ManualRatioPolicy([0.65, 0.95], enforce_ratio=0.0)
    assert policy.admission_quota(20) == [18, 2]  # 17.5 and 2.5: the spare slot goes to chunk 0
    assert sum(ManualRatioPolicy([0.1, 0.4, 0.7], 0.0).admission_quota(101)) == 101
