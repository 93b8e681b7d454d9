"""EvalSettings: what one evaluation job reads from the workflow config, typed, built from the validated config.

While planning, the workflow writes the settings that change the answers to the eval stage file (a tracked input
of the generate rule) and the others to eval.run.json (rules/common.smk); generate.py builds the same
EvalSettings from the two (`from_files`). Each field names its config key(s), so the schema stays the only list
of keys and their defaults.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sftflow import config as C
from sftflow import stage_config
from sftflow.errors import SftflowError

# NeMo-Skills' prompt for gsm8k / math / math500: what eval uses when neither eval.prompt_config nor
# prepare_data.prompt_config is set (training on the bare problem, NeMo-Skills' SFT default).
DEFAULT_EVAL_PROMPT = "generic/math"


def _from(*keys: str, transport: bool = False) -> Any:
    """A field read from the first of `keys` that is set (not null or empty). `transport`: it only decides how answers are
    fetched (who pays, how many at once, how long to wait), not what they are."""
    return field(metadata={"keys": keys, "transport": transport})


@dataclass(frozen=True)
class EvalSettings:
    """The settings of one (model, benchmark) evaluation; see config/README.md for each key."""

    server_type: str = _from("eval.server_type")
    server_address: str | None = _from("eval.server_address")
    server_model: str | None = _from("eval.server_model")
    api_key_env: str | None = _from("eval.api_key_env", transport=True)
    endpoint: str = _from("eval.endpoint")
    # the training prompt, unless eval.prompt_config names another (DEFAULT_EVAL_PROMPT when neither does)
    prompt_config: str = _from("eval.prompt_config", "prepare_data.prompt_config")
    system_message: str | None = _from("prepare_data.system_message")
    chat_template: str | None = _from("model.chat_template")
    chat_template_kwargs: dict | None = _from("prepare_data.chat_template_kwargs")
    max_new_tokens: int = _from("eval.max_new_tokens")
    temperature: float = _from("eval.temperature")
    top_p: float = _from("eval.top_p")
    concurrency: int = _from("eval.concurrency", transport=True)
    max_retries: int = _from("eval.max_retries", transport=True)
    request_timeout: float = _from("eval.request_timeout", transport=True)
    server_start_timeout: float = _from("eval.server_start_timeout", transport=True)
    grading_timeout: float = _from("eval.grading_timeout", transport=True)
    max_samples: int | None = _from("eval.max_samples")
    extract_from_boxed: bool = _from("eval.extract_from_boxed")
    extract_regex: str = _from("eval.extract_regex")

    @classmethod
    def from_config(cls, config: dict) -> EvalSettings:
        """From a validated workflow config (defaults filled)."""
        values = {}
        for f in fields(cls):
            found = [C.lookup(config, key)[1] for key in f.metadata["keys"]]
            values[f.name] = next((v for v in found if v), found[-1])
        values["prompt_config"] = values["prompt_config"] or DEFAULT_EVAL_PROMPT
        return cls(**values)

    @classmethod
    def config_keys(cls) -> list[str]:
        """Every config key the settings are read from."""
        return [key for f in fields(cls) for key in f.metadata["keys"]]

    @classmethod
    def from_values(cls, values: dict[str, Any], where: str) -> EvalSettings:
        """From {field name: value} (what the eval stage files hold; a field left out takes its config key's schema
        default), each value checked against the schema of its config key. Errors name `where` and the key."""
        by_name = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise SftflowError(
                f"{where}: {', '.join(unknown)}: not an evaluation setting (known: {', '.join(by_name)})"
            )
        config: dict[str, dict] = {key.split(".")[0]: {} for key in cls.config_keys()}
        for name, value in values.items():
            section, key = by_name[name].metadata["keys"][0].split(".")
            config[section][key] = value
        try:
            config = {section: C.validate_section(section, given) for section, given in config.items()}
        except SftflowError as err:
            raise SftflowError(f"{where}: {err}") from None
        return cls.from_config(config)

    @classmethod
    def from_files(cls, *paths: str | os.PathLike) -> EvalSettings:
        """The settings the generate rule hands its job: the eval stage file (the settings that change the answers),
        then eval.run.json (the rest); or a standalone run's --config files (JSON or YAML). Later files win."""
        values: dict[str, Any] = {}
        for path in paths:
            values.update(stage_config.read_mapping(path))
        return cls.from_values(values, " + ".join(map(str, paths)) or "the evaluation settings")

    @classmethod
    def result_names(cls) -> list[str]:
        """The settings that change the answers: the generate rule's rerun trigger, and what eval.json
        requires to be equal for results to be put side by side."""
        return [f.name for f in fields(cls) if not f.metadata["transport"]]

    def result_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.result_names()}

    def transport_settings(self) -> dict[str, Any]:
        """The settings that only decide how answers are fetched (not a rerun trigger)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["transport"]}

    def recorded(self) -> dict[str, Any]:
        """What metrics.json records (no api_key_env: where a secret lives is not a result)."""
        return {k: v for k, v in asdict(self).items() if k != "api_key_env"}
