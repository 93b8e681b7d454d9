"""The shipped config validates, and config/README.md documents every key of the schema."""

import copy

import yaml

from sftflow import config as C
from tests.conftest import REPO


def test_default_config_validates_and_gets_every_default():
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    filled = C.validate_workflow_config(copy.deepcopy(cfg))
    assert filled["prepare_data"]["filters"]["remove_no_code"] is False
    assert filled["prepare_data"]["input_key"] == "problem"
    assert filled["output_dir"] == "results"


def test_config_readme_is_generated_from_the_schema():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_config_docs", REPO / "scripts" / "make_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "config" / "README.md").read_text() == module.render(), (
        "run: python scripts/make_config_docs.py > config/README.md"
    )


def test_conda_envs_pin_what_requirements_txt_pins():
    """--sdm conda on a cluster must install the versions the tests ran with (requirements.txt)."""
    import re

    import yaml

    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version.strip()
    rules_envs = set()
    for smk in (REPO / "rules").glob("*.smk"):
        rules_envs |= set(re.findall(r'"\.\./(envs/\w+\.yaml)"', smk.read_text()))
    assert rules_envs == {f"envs/{p.name}" for p in (REPO / "envs").glob("*.yaml")}  # every env used, none missing
    for env_file in (REPO / "envs").glob("*.yaml"):
        env = yaml.safe_load(env_file.read_text())
        (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
        assert "python=3.11" in env["dependencies"], env_file
        for requirement in pip:
            if requirement.startswith("--"):  # pip options such as --extra-index-url
                continue
            # A local path (`-e ..`, `.`) resolves against the copy Snakemake makes in .snakemake/conda: see envs/.
            assert not requirement.startswith(("-e", ".", "/")), f"{env_file}: {requirement} cannot be installed"
            assert "==" in requirement, f"{env_file}: {requirement} is not pinned"
            name, version = requirement.split("==")
            name = re.sub(r"\[.*\]", "", name).lower()
            assert pins.get(name) == version, f"{env_file}: {requirement} vs requirements.txt {pins.get(name)}"


# The config keys with a NeMo-Skills sft.yaml equivalent (issue 27): each must be in the parity table.
NEMO_SKILLS_TRAINING_KEYS = {
    "training.max_num_epochs", "training.max_num_steps", "training.seed", "training.train_global_batch_size",
    "training.train_micro_batch_size", "training.learning_rate", "training.min_learning_rate",
    "training.warmup_steps", "training.weight_decay", "training.adam_beta1", "training.adam_beta2",
    "training.adam_eps", "training.max_grad_norm", "training.precision", "training.save_period",
    "training.activation_checkpointing", "training.tensor_model_parallel_size", "training.backend",
    "packing.enabled", "packing.max_total_sequence_length", "packing.algorithm", "packing.overlong",
    "training.validation_data", "training.val_period", "training.val_batches", "training.val_global_batch_size",
    "training.val_micro_batch_size", "training.val_at_start", "training.val_at_end",
}  # fmt: skip


def test_the_parity_tables_training_defaults_are_the_schemas():
    """docs/nemo-skills-parity.md's training table gives sftflow's default of every key; it cannot drift."""
    import json
    import re

    doc = (REPO / "docs" / "nemo-skills-parity.md").read_text()
    section = doc.split("## Training: every `sft.yaml` key", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        if len(cells) == 4:  # key | NeMo-Skills | sftflow key: default | why
            for key, text in re.findall(r"`((?:training|packing)\.\w+)`: `([^`]+)`", cells[2]):
                try:
                    documented[key] = json.loads(text)
                except json.JSONDecodeError:
                    documented[key] = text  # an enum value such as bf16
    assert NEMO_SKILLS_TRAINING_KEYS <= set(documented), NEMO_SKILLS_TRAINING_KEYS - set(documented)
    schema = C.load_schema()
    for key, value in documented.items():
        section_name, name = key.split(".")
        default = schema["properties"][section_name]["properties"][name]["default"]
        assert value == default and type(value) is type(default), (
            f"{key}: the page says {value!r}, the schema {default!r}"
        )
