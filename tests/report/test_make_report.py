"""make_report writes every asset the report_assets rule declares, from a run's outputs and the config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sftflow.report.cli import ReportOutputs, main, make_report
from tests.conftest import REPO
from tests.report.conftest import png_size
from tests.report.html_tables import html_tables

CONFIG = {"output_dir": "results", "prepare_data": {"input_key": "problem", "filters": {"remove_contaminated": True}}}


def test_every_asset_is_written_and_readable(tmp_path, report_inputs):
    outputs = ReportOutputs.in_dir(tmp_path / "report")
    make_report(report_inputs, outputs, CONFIG)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(ReportOutputs.FILE_NAMES.values())
    for path in outputs.paths():
        if path.suffix == ".png":
            width, height = png_size(path)
            assert width == 1000 and height > 300
        elif path.suffix == ".html":
            assert html_tables(path) or "<pre>" in path.read_text(), path
    assert yaml.safe_load(outputs.config_yaml.read_text()) == CONFIG
    assert "remove_contaminated: true" in outputs.config_html.read_text()
    (funnel, *_) = html_tables(outputs.data_prep)
    assert funnel[-1][:5] == ["written", "—", "—", "—", "35"]


def test_rule_declares_exactly_the_assets_make_report_writes():
    rule = (REPO / "rules" / "report.smk").read_text()
    declared = re.findall(r'out\("report", "([^"]+)"\)', rule)
    assert sorted(declared) == sorted(ReportOutputs.FILE_NAMES.values())
    for name in ReportOutputs.FILE_NAMES:
        assert f"        {name}=report(" in rule, name
    for caption in re.findall(r'caption="\.\./(report/[^"]+)"', rule):
        assert (REPO / caption).is_file(), caption


def test_command_line_writes_the_report_of_an_output_dir(tmp_path, results_dir):
    config = tmp_path / "config.yaml"
    config.write_text(Path(REPO / "config" / "config.yaml").read_text())
    assert main(["--output-dir", str(results_dir), "--config", str(config)]) == 0
    written = yaml.safe_load((results_dir / "report" / "config.yaml").read_text())
    assert written["training"]["num_training_jobs"] == 2
    assert written["prepare_data"]["input_key"] == "problem"  # a default filled from the schema
