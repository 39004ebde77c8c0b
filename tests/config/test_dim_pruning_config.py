"""DimPruningConfig: validation messages, conversion from Hydra's plain mappings, to_dict."""

import pytest
from omegaconf import OmegaConf

from torchrec_fiited import DimPruningConfig, FiitedConfig


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"target_ratio": 1.0}, r"target_ratio must be in \[0, 1\) \(0 = off\), got 1.0"),
        ({"target_ratio": -0.1}, r"target_ratio must be in \[0, 1\)"),
        ({"target_ratio": True}, r"target_ratio must be in \[0, 1\)"),
        ({"scope": "row"}, r"scope must be one of \['table', 'global'\], got 'row'"),
        ({"shared_columns": 1}, r"shared_columns must be a bool, got 1"),
        ({"cold_start_steps": 0}, r"cold_start_steps must be an integer >= 1, got 0"),
        ({"cold_start_steps": 2.5}, r"cold_start_steps must be an integer >= 1"),
        ({"revisit_interval": -1}, r"revisit_interval must be an integer >= 0, got -1"),
        ({"decay": 0.0}, r"decay must be in \(0, 1\], got 0.0"),
        ({"decay": 1.5}, r"decay must be in \(0, 1\]"),
    ],
)
def test_bad_values_name_the_field_and_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        DimPruningConfig(**fields)
    with pytest.raises(ValueError, match=message):  # also when it arrives as a plain mapping
        FiitedConfig(dim_pruning=fields)


def test_unknown_fields_and_wrong_types_are_rejected():
    with pytest.raises(ValueError, match=r"dim_pruning has unknown fields \['target'\]"):
        FiitedConfig(dim_pruning={"target": 0.5})
    with pytest.raises(ValueError, match="dim_pruning must be a DimPruningConfig or a mapping"):
        FiitedConfig(dim_pruning=0.5)


def test_off_by_default_and_to_dict_nests():
    assert not FiitedConfig().dim_pruning.enabled
    cfg = FiitedConfig(dim_pruning={"target_ratio": 0.5, "scope": "global", "cold_start_steps": 7})
    assert cfg.dim_pruning == DimPruningConfig(target_ratio=0.5, scope="global", cold_start_steps=7)
    assert cfg.dim_pruning.enabled
    assert cfg.to_dict()["dim_pruning"] == {
        "target_ratio": 0.5, "scope": "global", "shared_columns": False, "cold_start_steps": 7,
        "revisit_interval": 0, "decay": 1.0,
    }
    assert FiitedConfig(**cfg.to_dict()) == cfg  # the checkpoint form converts back


def test_hydra_forms_convert():
    # A structured config round trip, and the plain (Dict)Config the app hands over.
    structured = OmegaConf.structured(FiitedConfig(dim_pruning=DimPruningConfig(0.25)))
    assert OmegaConf.to_object(structured).dim_pruning == DimPruningConfig(0.25)
    node = OmegaConf.create({"num_chunks": 2, "dim_pruning": {"target_ratio": 0.75}})
    assert FiitedConfig(**OmegaConf.to_container(node)).dim_pruning.target_ratio == 0.75
    assert FiitedConfig(dim_pruning=node.dim_pruning).dim_pruning.target_ratio == 0.75
