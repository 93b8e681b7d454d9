"""A user's config file means exactly what it says, plus the schema's defaults; every value knows its source.

Replays issue 12's first two problems: the demo's config/config.yaml leaked into `--configfile my.yaml`
(max_solution_length 200, the demo filters, min_learning_rate 0.0002 above the user's learning rate, named
in an error for a key the user never set), and `--configfile my.yaml results/eval.json` ate the target.
"""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from sftflow import config as C
from tests.conftest import REPO, snakemake

# A user's own experiment: only what they chose to write.
USER_CONFIG = """
output_dir: results/mine
model:
  base_model: /models/SmolLM2-135M-Instruct
prepare_data:
  input_files: gen/output-rs*.jsonl
training:
  learning_rate: 1.0e-5
  max_num_steps: 10
"""


def show_config(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "show_config.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def effective(text: str) -> dict[str, tuple[str, str]]:
    """show_config's output as {dotted key: (value text, source)}."""
    found, path = {}, []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        path = path[:depth]
        key, _, rest = line.strip().partition(":")
        if not rest.strip():
            path.append(key)
            continue
        value, _, source = rest.partition("  # ")
        found[".".join([*path, key])] = (value.strip(), source)
    return found


def schema_default(dotted: str):
    node = C.load_schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    return node["default"]


def test_a_user_config_gets_schema_defaults_not_the_demos(tmp_path):
    (tmp_path / "my.yaml").write_text(USER_CONFIG)
    result = show_config("--configfile", "my.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    values = effective(result.stdout)
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    # The user's values, from their file.
    assert values["training.learning_rate"] == ("1.0e-05", "my.yaml")
    assert values["training.max_num_steps"] == ("10", "my.yaml")
    # What the demo sets and the user did not: the schema's defaults, never the demo's values.
    assert demo["prepare_data"]["max_solution_length"] == 200 and demo["training"]["warmup_steps"] == 60
    demo_keys = ["prepare_data.max_solution_length", "training.min_learning_rate", "training.warmup_steps",
                 "training.max_num_epochs", "demo.enabled", "eval.benchmarks"]  # fmt: skip
    filters = [f"prepare_data.filters.{name}" for name in demo["prepare_data"]["filters"]]
    demo_keys += [key for key in filters if C.lookup(demo, key)[1] != schema_default(key)]
    assert len(demo_keys) > 8
    for key in demo_keys:
        found, demo_value = C.lookup(demo, key)
        assert found and demo_value != schema_default(key), key  # the demo sets something else
        value, source = values[key]
        assert (yaml.safe_load(value), source) == (schema_default(key), C.SCHEMA_DEFAULT), key
    assert "config/config.yaml" not in result.stdout
    assert result.stdout.startswith("# effective config: schema defaults < my.yaml\n")


def test_without_a_configfile_the_demo_applies_and_says_so():
    result = show_config()
    assert result.returncode == 0, result.stderr
    values = effective(result.stdout)
    assert values["demo.enabled"] == ("true", "config/config.yaml")
    assert values["prepare_data.max_solution_length"] == ("200", "config/config.yaml")
    assert values["training.weight_decay"][1] == C.SCHEMA_DEFAULT


def test_config_errors_name_where_each_value_came_from(workdir, tmp_path):  # noqa: F811
    (workdir / "my.yaml").write_text(USER_CONFIG)
    (workdir / "more.yaml").write_text("training:\n  min_learning_rate: 0.001\n")
    args = ("--configfile", "my.yaml", "more.yaml", "--config", "output_dir=results/other")
    expected = (
        "config key 'training.min_learning_rate' (0.001) is above training.learning_rate (1e-05)\n"
        "  where these values come from: training.min_learning_rate = 0.001 (more.yaml); "
        "training.learning_rate = 1e-05 (my.yaml)"
    )
    shown = show_config(*args, cwd=workdir)
    assert shown.returncode == 2 and expected in shown.stderr, shown.stderr
    result = snakemake("-n", "--cores", "1", "results/other/eval.json", *args, cwd=workdir)
    assert result.returncode != 0 and expected in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    # --config is a source of its own, after the files.
    (workdir / "more.yaml").write_text("training:\n  min_learning_rate: 0.000001\n")
    values = effective(show_config(*args, cwd=workdir).stdout)
    assert values["output_dir"] == ("results/other", "--config")
    assert values["training.min_learning_rate"] == ("1.0e-06", "more.yaml")
    # A default named in an error says so too.
    (workdir / "bad.yaml").write_text("demo:\n  enabled: false\n")
    result = snakemake("-n", "--cores", "1", "--configfile", "bad.yaml", cwd=workdir)
    assert "prepare_data.input_files = None (schema default)" in result.stdout + result.stderr
    assert "demo.enabled = False (bad.yaml)" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_value_sources_follow_snakemakes_merge_order():
    layers = [
        ("a.yaml", {"training": {"learning_rate": 1, "warmup_steps": 2}, "eval": {"benchmark_files": {"gsm8k": "x"}}}),
        ("b.yaml", {"training": {"learning_rate": 3}, "eval": {"benchmark_files": None}}),
        ("--config", {"eval": {"benchmark_files": {"math": "y"}}}),
    ]
    sources = C.value_sources(layers)
    assert sources == {
        "training.learning_rate": "b.yaml",
        "training.warmup_steps": "a.yaml",
        "eval.benchmark_files.math": "--config",
    }
    assert C.source_of("eval.benchmark_files.math", sources) == "--config"
    assert C.source_of("training.max_grad_norm", sources) == C.SCHEMA_DEFAULT


def test_readme_commands_put_the_target_before_configfile():
    """`--configfile` takes several values: a target after it is read as a config file (a raw traceback)."""
    docs = [REPO / "README.md", REPO / "config" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    commands = [line for doc in docs for line in doc.read_text().splitlines() if "snakemake" in line]
    checked = 0
    for line in commands:
        match = re.search(r"--configfile(?:=|\s+)((?:\S+\.ya?ml\s*)+)(.*)", line)
        if match:
            checked += 1
            rest = match.group(2).split("#")[0]
            assert not re.match(r"\s*(results/\S+|all)\b", rest), f"target after --configfile: {line}"
    assert checked >= 3
