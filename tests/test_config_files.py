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
