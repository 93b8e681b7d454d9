"""Write config/README.md from config/schema.yaml, so every config key is documented from one source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Configuration reference

Your experiment is your own config file: `snakemake --cores 8 results/eval.json --configfile my.yaml` (the
target before `--configfile`, which takes several files). It means exactly what it says, plus the defaults
below, taken from `config/schema.yaml`. `config/config.yaml` is the offline demo: it is read only when no
`--configfile` is given (`make demo`). Several files merge in order, then `--config KEY=VALUE`.
`python scripts/show_config.py --configfile my.yaml` prints the effective config with each value's source,
and a config error names the source of every value it mentions (docs/experiments.md). The workflow
validates the config before any job starts: an unknown key or a wrong value fails naming the key.
`python scripts/prepare_data.py` takes the keys of the `prepare_data` section as `++key=value`
(plus `++output_path`, `++tokenizer`, `++chat_template`). Its defaults are NeMo-Skills' `math_sft.yaml`
(every filter off, the bare problem as the prompt); docs/nemo-skills-parity.md compares every key.
The `training` and `packing` defaults are those of NeMo-Skills' `ns nemo_rl sft` (its `sft.yaml`): a learning
rate of 1e-6, constant, no gradient clipping, 32 sequences per optimizer step (`train_global_batch_size` counts
sequences, as NeMo-RL's; the trainer packs each step's sequences), rows of 4096 tokens, over-long sequences kept
out of the loss. docs/nemo-skills-parity.md gives each key's NeMo-Skills value and the reason for any difference.

This file is generated: `python scripts/make_config_docs.py > config/README.md`.
"""


def fmt_default(node: dict) -> str:
    if "default" not in node or isinstance(node.get("default"), dict) and node.get("type") == "object":
        return ""
    return f"`{json.dumps(node['default'])}`"


def fmt_type(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join("null" if v is None else str(v) for v in node["enum"])
    t = node.get("type", "")
    return " \\| ".join(t) if isinstance(t, list) else str(t)


def walk(node: dict, prefix: str, rows: list) -> None:
    for key, sub in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        if sub.get("type") == "object" and "properties" in sub:
            rows.append((f"**{name}**", "section", "", sub.get("description", "")))
            walk(sub, name + ".", rows)
        else:
            rows.append((f"`{name}`", fmt_type(sub), fmt_default(sub), sub.get("description", "")))


def render() -> str:
    from sftflow.config import load_schema

    schema = load_schema()  # with training.backend's enum from the registry
    rows: list = []
    walk(schema, "", rows)
    lines = [HEADER, "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {k} | {t} | {d} | {m.replace('|', '/')} |" for k, t, d, m in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
