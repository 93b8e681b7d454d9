"""Prompt configs: YAML files with a `system` message, a `user` template and an optional few-shot `examples` block."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sftflow.errors import SftflowError

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
KNOWN_KEYS = {"system", "user", "examples"}


class _Fields:
    """The row's fields with `examples` from the prompt config, as format_map reads them (without a merged copy)."""

    __slots__ = ("row", "examples")

    def __init__(self, row: dict, examples: str):
        self.row = row
        self.examples = examples

    def __getitem__(self, key: str):
        return self.examples if key == "examples" else self.row[key]


@dataclass(frozen=True)
class PromptConfig:
    name: str
    system: str
    user: str
    examples_text: str = ""

    def fill(self, row: dict, where: str = "") -> str:
        """The user message for `row`: `{field}` placeholders filled from the row, `{examples}` from the config."""
        try:
            return self.user.format_map(_Fields(row, self.examples_text))
        except KeyError as err:
            raise SftflowError(
                f"{where}prompt config '{self.name}' uses {{{err.args[0]}}} but the row has no such field "
                f"(fields: {', '.join(sorted(row))})"
            ) from None
        except (IndexError, ValueError) as err:
            raise SftflowError(
                f"prompt config '{self.name}': bad template ({err}); write literal braces as {{{{ }}}}"
            ) from None

    def system_text(self) -> str:
        return self.system.format_map({}) if self.system else ""


def available() -> list[str]:
    return sorted(str(p.relative_to(PROMPTS_DIR).with_suffix("")) for p in PROMPTS_DIR.rglob("*.yaml"))


def load_prompt_config(name_or_path: str | None, input_key: str = "problem") -> PromptConfig:
    """Load a bundled prompt config by name (e.g. 'generic/math') or the user's own YAML by path.

    None (the default, as in NeMo-Skills' math_sft.yaml) is the bare problem: the user message is the row's
    `input_key` field, with no system message and no instruction.
    """
    if name_or_path is None:
        return PromptConfig(name="none (the bare problem)", system="", user="{" + input_key + "}")
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SftflowError(
            f"prompt_config '{name_or_path}': no such file and no bundled config of that name "
            f"(bundled: {', '.join(available())})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SftflowError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        raise SftflowError(f"{path}: a prompt config needs a 'user' template string")
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise SftflowError(f"{path}: unknown keys {sorted(unknown)} (allowed: {sorted(KNOWN_KEYS)})")
    examples_text = ""
    if data.get("examples"):
        block = data["examples"]
        if not isinstance(block, dict) or "template" not in block or not isinstance(block.get("items"), list):
            raise SftflowError(f"{path}: 'examples' needs 'template' and a list of 'items'")
        try:
            examples_text = "".join(block["template"].format_map(item) for item in block["items"])
        except KeyError as err:
            raise SftflowError(f"{path}: examples template uses {{{err.args[0]}}} missing from an item") from None
    return PromptConfig(
        name=str(name_or_path), system=data.get("system") or "", user=data["user"], examples_text=examples_text
    )
