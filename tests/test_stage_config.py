"""Stage config files: written only when their content changes (so their mtime is a rerun trigger), read back
with errors that name the file."""

from __future__ import annotations

import os

import pytest

from sftflow import stage_config
from sftflow.errors import SftflowError


def test_an_unchanged_file_is_not_rewritten_and_keeps_its_mtime(tmp_path):
    path = tmp_path / "config" / "train.json"
    assert stage_config.write_if_changed(path, {"b": 1, "a": [1, 2]}) is True
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    # the same data, keys in another order: the same canonical text
    assert stage_config.write_if_changed(path, {"a": [1, 2], "b": 1}) is False
    assert path.stat().st_mtime_ns == 1_000_000_000
    assert stage_config.write_if_changed(path, {"a": [1, 2], "b": 2}) is True
    assert path.stat().st_mtime_ns != 1_000_000_000
    assert stage_config.read(path) == {"a": [1, 2], "b": 2}
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["train.json"]  # no temporary file left


def test_a_file_another_program_changed_is_written_again(tmp_path):
    path = tmp_path / "eval.json"
    stage_config.write_if_changed(path, {"a": 1})
    path.write_text('{"a": 1}')  # same data, other text
    assert stage_config.write_if_changed(path, {"a": 1}) is True
    assert path.read_text() == stage_config.canonical_json({"a": 1})


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(SftflowError, match=r"absent.json: stage config file not found"):
        stage_config.read(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"a": 1,\n}')
    with pytest.raises(SftflowError, match=r"bad.json:2: not valid JSON"):
        stage_config.read(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SftflowError, match=r"list.yaml: expected a mapping of config keys, found list"):
        stage_config.read_mapping(tmp_path / "list.yaml")
    (tmp_path / "ok.yml").write_text("max_new_tokens: 5\n")
    assert stage_config.read_mapping(tmp_path / "ok.yml") == {"max_new_tokens": 5}
