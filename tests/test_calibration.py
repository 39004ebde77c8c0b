"""The calibration check of the hard synthetic data: which metrics pass (a)-(c) and which fail."""

import json
from pathlib import Path

import pytest

from torchrec_fiited.calibration import Thresholds, check, collect, main


def _write(root: Path, seed: int, aucs: dict) -> None:
    for emb, auc in aucs.items():
        d = root / f"{emb}_{seed}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"emb": emb, "seed": seed, "test_auc": auc}))


GOOD = {"full": 0.80, "hash": 0.72, "freq_oracle": 0.798, "full_d4": 0.785}


def test_calibrated_runs_pass(tmp_path, capsys):
    for seed in (0, 1):
        _write(tmp_path, seed, GOOD)
    assert check(collect([tmp_path]), Thresholds()) == []
    assert main([str(tmp_path)]) == 0
    assert "| 0 | 0.8000 | -0.0800 | -0.0020 | -0.0150 |" in capsys.readouterr().out


@pytest.mark.parametrize("arm,auc,condition", [
    ("hash", 0.78, "(a)"),          # hashing loses only 0.02
    ("freq_oracle", 0.794, "(b)"),  # the oracle loses 0.006
    ("full_d4", 0.795, "(c)"),      # a quarter of the dims loses only 0.005
])
def test_each_condition_fails_on_its_own(tmp_path, arm, auc, condition):
    _write(tmp_path, 0, GOOD)
    _write(tmp_path, 1, {**GOOD, arm: auc})
    failures = check(collect([tmp_path]), Thresholds())
    assert len(failures) == 1 and failures[0].startswith(f"seed 1: {condition}")
    assert main([str(tmp_path)]) == 1


def test_dim_loss_must_exceed_twice_the_oracle_loss(tmp_path):
    _write(tmp_path, 0, {**GOOD, "freq_oracle": 0.792, "full_d4": 0.786})  # 0.014 < 2 x 0.008
    assert [f[:11] for f in check(collect([tmp_path]), Thresholds(oracle_gap=0.01))] == ["seed 0: (c)"]


def test_missing_arm_and_duplicate_run(tmp_path):
    _write(tmp_path, 0, {"full": 0.8, "hash": 0.7})
    assert check(collect([tmp_path]), Thresholds()) == [
        "seed 0: missing arms ['freq_oracle', 'full_d4']"]
    _write(tmp_path / "again", 0, {"hash": 0.7})
    with pytest.raises(ValueError, match="a second hash run for seed 0"):
        collect([tmp_path])
