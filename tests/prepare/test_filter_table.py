"""The filter table is the one list of prepare_data's filters: every `filters.<name>` key of the schema is a table
entry (or a stage that runs elsewhere), each entry builds its stage under its own name, in the table's order."""

from __future__ import annotations

import pytest

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.prepare import filters as F
from sftflow.prepare.filter_table import OTHER_STAGES, ROW_FILTERS, build_row_filters
from sftflow.prepare.settings import PrepareConfig


def config(*args: str) -> PrepareConfig:
    return PrepareConfig.from_section(C.parse_overrides(["++input_files=x", "++output_path=y", *args]))


def test_every_schema_filter_is_in_the_table_or_runs_elsewhere():
    schema_filters = set(C.section_schema("prepare_data")["properties"]["filters"]["properties"])
    assert set(ROW_FILTERS).isdisjoint(OTHER_STAGES)
    assert schema_filters == set(ROW_FILTERS) | set(OTHER_STAGES)


def test_each_switched_on_filter_is_built_under_its_name_in_table_order(tmp_path):
    contamination = tmp_path / "contaminated.jsonl"
    contamination.write_text('{"problem": "What is 2 + 2?"}\n')
    switches = [f"++filters.{name}=true" for name in ROW_FILTERS]
    cfg = config(*switches, f"++contamination_file={contamination}")
    filters, skipped = build_row_filters(cfg)
    assert [stage.name for stage in filters] == list(ROW_FILTERS) and skipped == []
    assert all(isinstance(stage, F.RowFilter) for stage in filters)
    assert filters[1].key == cfg.input_key and {stage.key for stage in filters[2:]} == {cfg.output_key}
    off = config("++filters.remove_contaminated=true")  # NeMo-Skills' default: on, with no file to check against
    filters, skipped = build_row_filters(off)
    assert filters == [] and [s["stage"] for s in skipped] == ["remove_contaminated"]


def test_prepare_config_is_typed_and_names_a_wrong_key():
    cfg = config("++skip_first=2", "++filters.trim_prefix=true")
    assert cfg.skip_first == 2 and cfg.filters["trim_prefix"] is True and cfg.output_path == "y"
    with pytest.raises(SftflowError, match="skip_frist"):
        config("++skip_frist=2")
    with pytest.raises(SftflowError, match="num_output_samples"):
        config("++num_output_samples=5")  # without a downsampling_method
