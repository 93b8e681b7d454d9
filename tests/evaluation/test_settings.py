"""EvalSettings: built from the validated config, carried to generate.py as ++ arguments, read back the same."""

from __future__ import annotations

import copy

import pytest

from sftflow.config import load_schema, lookup, validate
from sftflow.errors import SftflowError
from sftflow.evaluation.settings import DEFAULT_EVAL_PROMPT, EvalSettings


def defaults() -> dict:
    return validate({}, load_schema())


def test_every_key_it_reads_is_a_schema_key():
    for key in EvalSettings.config_keys():
        assert lookup(defaults(), key)[0], key


def test_the_arguments_carry_exactly_the_config_settings():
    config = copy.deepcopy(defaults())
    config["eval"].update(server_model="a b;c", max_new_tokens=12, temperature=1e-5, concurrency=3)
    config["prepare_data"].update(system_message="Time: '04:00'", chat_template_kwargs={"enable_thinking": False})
    args = EvalSettings.override_args(config)
    assert len(args) == 6 and all(arg.startswith("++") for arg in args)
    assert EvalSettings.from_override_args(args) == EvalSettings.from_config(config)
    assert EvalSettings.override_args(defaults()) == []


def test_the_prompt_is_the_trainings_unless_eval_names_one():
    config = copy.deepcopy(defaults())
    assert EvalSettings.from_config(config).prompt_config == DEFAULT_EVAL_PROMPT
    config["prepare_data"]["prompt_config"] = "generic/default"
    assert EvalSettings.from_config(config).prompt_config == "generic/default"
    config["eval"]["prompt_config"] = "generic/math"
    assert EvalSettings.from_config(config).prompt_config == "generic/math"


def test_transport_settings_do_not_change_the_result_settings():
    names = EvalSettings.result_names()
    assert "max_new_tokens" in names and "prompt_config" in names
    assert not {"concurrency", "max_retries", "request_timeout", "api_key_env"} & set(names)


def test_unknown_and_bad_arguments_name_the_key():
    with pytest.raises(SftflowError, match=r"\+\+eval.benchmarks: not a key of the evaluation settings"):
        EvalSettings.from_override_args(["++eval.benchmarks=gsm8k"])
    with pytest.raises(SftflowError, match=r"eval.max_new_tokens"):
        EvalSettings.from_override_args(["++eval.max_new_tokens=many"])
