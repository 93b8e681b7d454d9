"""make_report writes every page the report rules declare, from a run's outputs and the config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sftflow.report.cli import ReportOutputs, main, make_report
from sftflow.report.pages import FILE_NAMES, RULE_PAGES
from tests.conftest import REPO
from tests.report.conftest import html_tables, png_size

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


def rule_blocks() -> dict[str, str]:
    """{rule name: its text} of rules/*.smk."""
    blocks = {}
    for path in (REPO / "rules").glob("*.smk"):
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", path.read_text(), re.S | re.M):
            blocks[match.group(1)] = match.group(2)
    return blocks


def test_each_rule_declares_exactly_the_pages_it_writes_and_together_they_are_all_of_them():
    blocks = rule_blocks()
    declared = []
    for rule, fields in RULE_PAGES.items():
        names = re.findall(r'out\("report", "([^"]+)"\)', blocks[rule])
        assert sorted(names) == sorted(FILE_NAMES[f] for f in fields), rule
        declared += names
        for caption in re.findall(r'caption="\.\./(report/[^"]+)"', blocks[rule]):
            assert (REPO / caption).is_file(), caption
    assert sorted(declared) == sorted(ReportOutputs.FILE_NAMES.values())
    for rule in ("report_data", "report_training", "report_config"):
        for field in RULE_PAGES[rule]:  # the output names are the ones run_from_snakemake reads
            assert f"        {field}=report(" in blocks[rule], (rule, field)


def test_command_line_writes_the_report_of_an_output_dir(tmp_path, results_dir):
    config = tmp_path / "config.yaml"
    config.write_text(Path(REPO / "config" / "config.yaml").read_text())
    assert main(["--output-dir", str(results_dir), "--config", str(config)]) == 0
    written = yaml.safe_load((results_dir / "report" / "config.yaml").read_text())
    assert written["training"]["num_training_jobs"] == 2
    assert written["prepare_data"]["input_key"] == "problem"  # a default filled from the schema
