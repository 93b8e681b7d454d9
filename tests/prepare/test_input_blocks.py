"""prepare_data's input cut into blocks at line ends, read by the worker processes themselves: the output and the
stats are the serial run's byte for byte, with blank lines, invalid rows (named by file and line), skip_first, a
last line without a line end, lines longer than a block and several files."""

from __future__ import annotations

import json

import pytest

from sftflow.prepare import blocks
from sftflow.prepare.cli import main


def line(problem: str, generation: str, correct=True, **extra) -> bytes:
    return json.dumps({"problem": problem, "generation": generation, "symbolic_correct": correct, **extra}).encode()


def tricky_files() -> dict[str, bytes]:
    """Three files: blank and whitespace-only lines, invalid rows, repeats, a long line, no final line end."""
    long = "x" * 700  # longer than the smallest block below
    first = [
        line("p1", "a \\boxed{1}"),
        b"",
        line("p1", "b \\boxed{2}", False),
        b"   \t",
        line("p2", "c \\boxed{3}"),
        line("p2", "d \\boxed{4}"),  # the first row after skip_first=3
        b"{not json",
        line("p1", "a \\boxed{1}"),  # a repeat of the first row
        b"[1, 2]",
        line("p3", f"{long} \\boxed{{5}}"),
        b"",
        b"",
        line("p3", "e \\boxed{6}", None),
        b'{"problem": 7, "generation": "s", "symbolic_correct": true}',
        line("p2", "d \\boxed{4}"),  # a repeat of a row after skip_first
    ]
    second = [line(f"q{i % 5}", f"sol {i % 7} \\boxed{{{i}}}", i % 3 != 0) for i in range(60)]
    second[10:10] = [b"", b'{"problem": "q1", "generation": "s", "symbolic_correct": "yes"}', b"\r"]
    third = [b"", b"", line("r1", "f \\boxed{1}"), line("r1", "f \\boxed{1}"), b'{"generation": "s"}', b"  "]
    return {
        "a.jsonl": b"\n".join(first) + b"\n",
        "b.jsonl": b"\n".join(second),  # no line end after the last line
        "c.jsonl": b"\n".join(third) + b"\n",
    }


def prepare(tmp_path, name: str, *args: str) -> tuple[bytes, dict]:
    gen = tmp_path / "gen"
    if not gen.exists():
        gen.mkdir()
        for file_name, content in tricky_files().items():
            (gen / file_name).write_bytes(content)
    out = tmp_path / name / "sft.jsonl"
    rc = main(
        [
            f"++input_files={gen}/*.jsonl",
            f"++output_path={out}",
            "++filters.remove_contaminated=false",
            "++filters.remove_len_outlier_problems=false",
            "++skip_invalid_rows=true",
            "++add_unlabeled=true",
            *args,
        ]
    )
    assert rc == 0
    stats = json.loads((out.parent / "sft.stats.json").read_text())
    for key in ("seconds", "output_path"):
        stats.pop(key)
    return out.read_bytes(), stats


@pytest.mark.parametrize("skip_first", [0, 3])
@pytest.mark.parametrize("shuffle", ["false", "true"])
def test_workers_reading_blocks_write_the_serial_output_and_stats(tmp_path, monkeypatch, skip_first, shuffle):
    args = [f"++skip_first={skip_first}", f"++do_shuffle={shuffle}"]
    serial, serial_stats = prepare(tmp_path, "serial", *args, "++num_workers=1")  # one block per file
    monkeypatch.setattr(blocks, "PARALLEL_MIN_BYTES", 0)
    for block in (64, 300, 1000):  # many blocks, some lines longer than a block
        monkeypatch.setattr(blocks, "CHUNK_BYTES", block)
        for workers in (1, 2):
            output, stats = prepare(tmp_path, f"w{workers}-{block}", *args, f"++num_workers={workers}")
            assert output == serial, (block, workers)
            assert stats == serial_stats, (block, workers)
    assert serial.count(b"\n") == serial_stats["rows_written"] > 0


def test_rows_lines_and_per_file_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(blocks, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 100)
    _, stats = prepare(tmp_path, "out", "++skip_first=3", "++num_workers=2")
    files = {info["path"].rsplit("/", 1)[1]: info for info in stats["input_files"]}
    # Blank lines are no rows, but count as lines; skip_first skips each file's first rows.
    assert [(f["rows"], f["skipped_first"], f["invalid"]) for f in files.values()] == [
        (11, 3, 3),
        (61, 3, 1),
        (3, 3, 0),
    ]
    assert stats["rows_read"] == 75 and stats["skipped_first"] == 9
    examples = [e.removeprefix(f"{tmp_path}/gen/") for e in stats["invalid_rows"]["examples"]]
    expected = [
        "a.jsonl:7: invalid JSON (",
        "a.jsonl:9: expected a JSON object, got list",
        "a.jsonl:14: field 'problem' should be a string, got int",
        "b.jsonl:12: field 'symbolic_correct' should be true/false, got str 'yes'",
    ]
    assert len(examples) == len(expected) and all(e.startswith(x) for e, x in zip(examples, expected)), examples
    assert stats["invalid_rows"]["count"] == 4


def test_last_line_without_line_end_is_read(tmp_path, monkeypatch):
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "x.jsonl").write_bytes(line("p", "a \\boxed{1}") + b"\n\n" + line("q", "b \\boxed{2}"))
    monkeypatch.setattr(blocks, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 16)
    output, stats = prepare(tmp_path, "out", "++num_workers=2", "++do_shuffle=false")
    assert stats["rows_read"] == 2 and output.count(b"\n") == 2 and b'"q"' in output.splitlines()[1]


def test_a_file_that_shrinks_while_it_is_cut_into_blocks_is_an_error(tmp_path, monkeypatch, capsys):
    """The main process sized the file, then it got shorter: an error naming it, not a run missing its rows."""
    path = tmp_path / "gen.jsonl"
    path.write_bytes(b"\n".join(line(f"p{i}", f"s{i} \\boxed{{{i}}}") for i in range(50)) + b"\n")
    cut = blocks.next_block

    def shrink_first(fd, offset, end, buffer):
        path.write_bytes(b"")  # emptied after its size was taken
        return cut(fd, offset, end, buffer)

    monkeypatch.setattr(blocks, "next_block", shrink_first)
    out = tmp_path / "sft.jsonl"
    assert main([f"++input_files={path}", f"++output_path={out}", "++filters.remove_contaminated=false"]) == 2
    assert f"{path}: the file changed while it was read" in capsys.readouterr().err
    assert not out.exists()
