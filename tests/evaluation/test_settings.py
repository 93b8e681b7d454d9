"""EvalSettings: built from the validated config, carried to generate.py in the eval stage files, read back the same."""

from __future__ import annotations

import copy

import pytest

from sftflow.config import load_schema, lookup, validate
from sftflow.errors import SftflowError
from sftflow.evaluation.settings import DEFAULT_EVAL_PROMPT, EvalSettings
from sftflow.stage_config import write_if_changed


def defaults() -> dict:
    return validate({}, load_schema())


def test_every_key_it_reads_is_a_schema_key():
    for key in EvalSettings.config_keys():
        assert lookup(defaults(), key)[0], key


def test_the_stage_files_carry_exactly_the_config_settings(tmp_path):
    config = copy.deepcopy(defaults())
    config["eval"].update(server_model="a b;c", max_new_tokens=12, temperature=1e-5, concurrency=3)
    config["prepare_data"].update(system_message="Time: '04:00'", chat_template_kwargs={"enable_thinking": False})
    settings = EvalSettings.from_config(config)
    tracked, run = tmp_path / "eval.json", tmp_path / "eval.run.json"
    write_if_changed(tracked, settings.result_settings())
    write_if_changed(run, settings.transport_settings())
    assert EvalSettings.from_files(tracked, run) == settings
    # eval.run.json left out: the transport settings are the defaults
    assert EvalSettings.from_files(tracked).concurrency == EvalSettings.from_config(defaults()).concurrency != 3
    assert EvalSettings.from_files() == EvalSettings.from_config(defaults())


def test_a_standalone_yaml_settings_file_names_settings_not_config_keys(tmp_path):
    (tmp_path / "mine.yaml").write_text("max_new_tokens: 512\nsystem_message: be brief\n")
    settings = EvalSettings.from_files(tmp_path / "mine.yaml")
    assert (settings.max_new_tokens, settings.system_message) == (512, "be brief")
    assert settings.prompt_config == DEFAULT_EVAL_PROMPT


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


def test_unknown_and_bad_settings_name_the_file_and_the_key(tmp_path):
    (tmp_path / "a.json").write_text('{"benchmarks": "gsm8k"}')
    with pytest.raises(SftflowError, match=r"a.json: benchmarks: not an evaluation setting"):
        EvalSettings.from_files(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"max_new_tokens": "many"}')
    with pytest.raises(SftflowError, match=r"b.json: config key 'eval.max_new_tokens'"):
        EvalSettings.from_files(tmp_path / "b.json")
    with pytest.raises(SftflowError, match=r"nowhere.json: stage config file not found"):
        EvalSettings.from_files(tmp_path / "nowhere.json")
