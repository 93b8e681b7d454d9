"""TrainingConfig: the typed `training:` section the trainer and both engines read."""

from __future__ import annotations

from dataclasses import fields

import pytest

from sftflow.config import load_schema
from sftflow.errors import SftflowError
from sftflow.train.settings import TrainingConfig


def test_its_fields_are_the_schemas_training_keys_in_order():
    keys = list(load_schema()["properties"]["training"]["properties"])
    assert [f.name for f in fields(TrainingConfig)] == keys


def test_missing_keys_take_the_schema_defaults_and_values_round_trip():
    config = TrainingConfig.from_section({"learning_rate": 1e-3, "average_steps": [5, 10]})
    assert config.learning_rate == 1e-3 and config.average_steps == [5, 10]
    assert config.backend == "fsdp" and config.max_grad_norm is None and config.loss_chunk_tokens is None
    assert TrainingConfig.from_section(config.as_dict()) == config


def test_a_bad_key_or_value_names_it():
    with pytest.raises(SftflowError) as err:
        TrainingConfig.from_section({"learning_rat": 1e-3})
    # One short line (issue 29: it used to list every key of the section, over 400 characters).
    assert str(err.value) == (
        "unknown config key 'training.learning_rat' (did you mean 'learning_rate'?); the keys of 'training' are "
        "listed in config/README.md"
    )
    with pytest.raises(SftflowError, match=r"training.seed"):
        TrainingConfig.from_section({"seed": "seven"})
