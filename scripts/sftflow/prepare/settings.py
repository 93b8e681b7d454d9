"""The typed config of data preparation: PrepareConfig, built once from a `prepare_data` section plus the job's own
keys (output_path, and input_files, tokenizer, chat_template where the rule fills them). config/README.md documents
each key; the schema (config/schema.yaml, with CLI_ONLY_KEYS) checks them and fills their defaults."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sftflow import config as C

# Keys of the job, not of the workflow's prepare_data section: the rule fills them from its input and output.
CLI_ONLY_KEYS = {
    "output_path": {
        "type": "string",
        "description": "Where to write the SFT JSONL (stats go beside it as <name>.stats.json).",
    },
    "tokenizer": {
        "type": ["string", "null"],
        "default": None,
        "description": "Tokenizer path or hub name (chat template, token counts).",
    },
    "chat_template": {
        "type": ["string", "null"],
        "default": None,
        "description": "Jinja chat template file replacing the tokenizer's.",
    },
}


def cli_schema() -> dict:
    """The prepare_data section's schema with the job's keys (CLI_ONLY_KEYS); output_path is required."""
    schema = copy.deepcopy(C.section_schema("prepare_data"))
    schema["properties"].update(copy.deepcopy(CLI_ONLY_KEYS))
    schema["required"] = ["output_path"]
    return schema


@dataclass(frozen=True)
class PrepareConfig:
    """One prepare_data job's settings, schema-checked and defaults filled (see config/README.md for each key)."""

    output_path: str
    input_files: str | list[str] | None
    tokenizer: str | None
    chat_template: str | None
    # what to read, and which rows
    input_key: str
    output_key: str
    skip_first: int
    skip_invalid_rows: bool
    add_correct: bool
    add_incorrect: bool
    add_unlabeled: bool
    use_judgement: bool
    # the filters (filters.<name>: on/off, or code_text_filter's mode) and their settings
    filters: dict[str, Any]
    contamination_file: str | None
    decontamination: dict[str, Any]
    majority_filter: dict[str, Any]
    trim_prefix_text: str
    arithmetic_tolerance: float
    code_begin: str
    code_end: str
    min_problem_length: int | None
    max_problem_length: int | None
    min_solution_length: int | None
    max_solution_length: int | None
    use_chars_for_min_length: bool
    # deduplication, order and downsampling
    deduplicate: bool
    downsampling_method: str | None
    num_output_samples: int | None
    random_seed: int
    do_shuffle: bool
    # formatting
    prompt_config: str | None
    system_message: str | None
    assistant_end: str | None
    chat_template_kwargs: dict[str, Any]
    output_format: str
    metadata: dict[str, Any] | None
    exclude_optional_keys: bool
    # the run
    num_workers: int | None
    allow_empty_output: bool

    @classmethod
    def from_section(cls, section: Mapping) -> PrepareConfig:
        """From a prepare_data section with output_path set: missing keys take the schema defaults, and an error
        (SftflowError) names the key that is wrong."""
        values = C.validate(copy.deepcopy(dict(section)), cli_schema())
        C.check_prepare_keys(values)
        return cls(**values)
