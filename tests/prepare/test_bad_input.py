"""Every kind of bad input gives a one-line error naming file and line, and leaves no output behind."""

from __future__ import annotations

import json

import pytest

from sftflow.prepare.cli import main

GOOD = json.dumps({"problem": "p", "generation": "s \\boxed{1}", "symbolic_correct": True}) + "\n"
BASE = ["++filters.remove_contaminated=false", "++filters.remove_len_outlier_problems=false"]


def run(tmp_path, content: bytes | None, *args):
    gen = tmp_path / "gen"
    gen.mkdir(exist_ok=True)
    if content is not None:
        (gen / "output-rs0.jsonl").write_bytes(content)
    out = tmp_path / "out" / "sft.jsonl"
    rc = main([f"++input_files={gen}/output-rs*.jsonl", f"++output_path={out}", *BASE, *args])
    return rc, out


@pytest.mark.parametrize(
    "content, message",
    [
        (GOOD.encode() + b"{not json\n", "output-rs0.jsonl:2: invalid JSON"),
        (
            GOOD.encode() + b'{"generation": "s", "symbolic_correct": true}\n',
            "output-rs0.jsonl:2: row has no field 'problem'",
        ),
        (
            GOOD.encode() + b'{"problem": 5, "generation": "s", "symbolic_correct": true}\n',
            "output-rs0.jsonl:2: field 'problem' should be a string",
        ),
        (
            GOOD.encode() + b'{"problem": "p", "generation": "s", "symbolic_correct": "yes"}\n',
            "output-rs0.jsonl:2: field 'symbolic_correct' should be true/false",
        ),
        (GOOD.encode() + b"[1, 2]\n", "output-rs0.jsonl:2: expected a JSON object"),
        (b"", "output-rs0.jsonl: file is empty"),
        (GOOD.encode() + b'{"problem": "caf\xe9", "generation": "s"}\n', "output-rs0.jsonl:2: not valid UTF-8"),
    ],
)
def test_bad_input_is_a_one_line_error_and_no_output(tmp_path, capsys, content, message):
    rc, out = run(tmp_path, content)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1]
    assert err[-1].startswith("error: ")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_pattern_matching_nothing_names_the_pattern(tmp_path, capsys):
    rc = main([f"++input_files={tmp_path}/nothing-*.jsonl", f"++output_path={tmp_path}/o.jsonl", *BASE])
    assert rc == 2
    assert f"pattern '{tmp_path}/nothing-*.jsonl' matches no file" in capsys.readouterr().err


def test_several_patterns_recursive_and_sorted(tmp_path):
    for sub, name in (("b", "output-rs1.jsonl"), ("a/deep", "output-rs0.jsonl")):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / name).write_text(GOOD.replace('"p"', f'"{name}"'))
    out = tmp_path / "o.jsonl"
    rc = main(
        [
            f"++input_files={tmp_path}/b/*.jsonl, {tmp_path}/**/output-rs0.jsonl",
            f"++output_path={out}",
            "++do_shuffle=false",
            "++exclude_optional_keys=false",
            *BASE,
        ]
    )
    assert rc == 0
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    assert [f["path"] for f in stats["input_files"]] == [
        f"{tmp_path}/a/deep/output-rs0.jsonl",
        f"{tmp_path}/b/output-rs1.jsonl",
    ]


def test_skip_invalid_rows_counts_and_reports(tmp_path):
    content = (
        GOOD.encode()
        + b"{bad\n"
        + b'{"problem": 1, "generation": "x"}\n'
        + b'{"problem": "q", "generation": "s2", "symbolic_correct": true}\n'
    )
    rc, out = run(tmp_path, content, "++skip_invalid_rows=true")
    assert rc == 0
    stats = json.loads((out.parent / "sft.stats.json").read_text())
    assert stats["invalid_rows"]["count"] == 2
    assert any(":2: invalid JSON" in e for e in stats["invalid_rows"]["examples"])
    assert any(":3: field 'problem' should be a string" in e for e in stats["invalid_rows"]["examples"])
    assert stats["rows_read"] == 4 and stats["rows_written"] == 2
    assert stats["input_files"][0]["invalid"] == 2


def test_unknown_key_is_an_error(tmp_path, capsys):
    rc, _ = run(tmp_path, GOOD.encode(), "++filters.drop_multi_boxd=true")
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown config key 'filters.drop_multi_boxd'" in err and "did you mean 'drop_multi_boxed'" in err


def test_wrong_value_type_names_the_key(tmp_path, capsys):
    rc, _ = run(tmp_path, GOOD.encode(), "++skip_first=many")
    assert rc == 2
    assert "config key 'skip_first'" in capsys.readouterr().err


def test_failure_keeps_previous_output_untouched(tmp_path):
    rc, out = run(tmp_path, GOOD.encode())
    assert rc == 0
    before = out.read_bytes()
    rc, _ = run(tmp_path, GOOD.encode() + b"{broken\n")
    assert rc == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft.jsonl", "sft.stats.json"]


def test_zero_rows_written_fails_naming_the_step_and_the_key(tmp_path, capsys):
    """Issue 12 (6): OpenMathInstruct-2-style rows (generated_solution, no correctness label) wrote 0 rows and
    exited 0. Now: an error naming the step that removed them and the key that keeps them; no output."""
    rows = [{"problem": f"p{i}", "generated_solution": f"s \\boxed{{{i}}}"} for i in range(5)]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    rc, out = run(tmp_path, content, "++output_key=generated_solution", "++filters.drop_multi_boxed=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists() and not out.with_name("sft.stats.json").exists()
    assert err[-1] == (
        "error: prepare_data wrote 0 of 5 rows read: selection dropped 5 unlabeled rows. To keep them: "
        "add_unlabeled=true (rows without a correctness label: no symbolic_correct / is_correct / judgement) "
        "(or set allow_empty_output=true to write an empty file)"
    )
    # A filter that removes everything is named with its key.
    multi = "".join(json.dumps({**r, "generated_solution": "\\boxed{1} or \\boxed{2}"}) + "\n" for r in rows)
    args = ("++output_key=generated_solution", "++add_unlabeled=true", "++filters.drop_multi_boxed=true")
    rc, out = run(tmp_path, multi.encode(), *args)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and not out.exists(), message
    assert (
        "prepare_data wrote 0 of 5 rows read: drop_multi_boxed dropped 5. To keep them: filters.drop_multi_boxed=false"
        in message
    )
    # allow_empty_output: an empty file, a warning, and the counts in the stats.
    rc, out = run(tmp_path, content, "++output_key=generated_solution", "++allow_empty_output=true")  # unlabeled
    assert rc == 0 and out.read_text() == ""
    assert "prepare_data wrote 0 of 5 rows read: selection dropped 5 unlabeled rows" in capsys.readouterr().err
    assert json.loads(out.with_name("sft.stats.json").read_text())["rows_written"] == 0


def test_a_byte_order_mark_on_the_first_line_is_accepted_by_prepare_data_and_pack_data(tmp_path, demo_tokenizer_dir):
    """Issue 29: a JSONL file saved with a UTF-8 byte-order mark (Windows editors write one) reads as without it,
    in prepare_data (generations) and in pack_data (prepared rows); the outputs are the same bytes."""
    from transformers import AutoTokenizer

    from sftflow.packing import pack_jsonl

    demo_tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    second = json.dumps({"problem": "q", "generation": "t \\boxed{2}", "symbolic_correct": True}) + "\n"
    outputs = {}
    for name, prefix in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        (tmp_path / name).mkdir()
        rc, out = run(tmp_path / name, prefix + (GOOD + second).encode())
        assert rc == 0
        prepared = out.read_bytes()
        assert prepared.count(b"\n") == 2 and not prepared.startswith(b"\xef\xbb\xbf")
        (tmp_path / f"{name}.jsonl").write_bytes(prefix + prepared)
        pack_jsonl(tmp_path / f"{name}.jsonl", tmp_path / f"{name}_packed", demo_tok, {"max_total_sequence_length": 64})
        shards = sorted((tmp_path / f"{name}_packed").glob("*.safetensors"))
        outputs[name] = (prepared, [s.read_bytes() for s in shards])
    assert outputs["bom"] == outputs["plain"] and outputs["plain"][1]


def test_an_output_path_that_is_an_input_is_refused_and_a_glob_over_the_output_leaves_it_out(tmp_path, capsys):
    """Issue 29: `++input_files=gen.jsonl ++output_path=gen.jsonl` replaced the generations with the SFT rows; a
    glob over the output's folder read the previous output back on a rerun."""
    gen = tmp_path / "gen.jsonl"
    gen.write_bytes(GOOD.encode())
    before = gen.read_bytes()
    rc = main([f"++input_files={gen}", f"++output_path={gen}", *BASE])
    err = capsys.readouterr().err
    assert rc != 0 and gen.read_bytes() == before  # nothing written, nothing read
    assert f"input_files '{gen}' is also this run's output ({gen}): writing it would overwrite the input" in err
    assert not list(tmp_path.glob("gen.stats.json"))

    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "output-rs0.jsonl").write_bytes(GOOD.encode())
    args = [f"++input_files={folder}/*.jsonl", f"++output_path={folder}/sft.jsonl", *BASE]
    assert main(args) == 0
    first = (folder / "sft.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 0  # the rerun: the glob now matches the first run's output too
    err = capsys.readouterr().err
    assert (
        f"input_files pattern '{folder}/*.jsonl' also matches {folder}/sft.jsonl, this run's own output: left out"
        in err
    )
    assert (folder / "sft.jsonl").read_bytes() == first
