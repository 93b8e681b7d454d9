"""pack_jsonl's streaming, multi-process path writes exactly what a plain in-memory tokenizer writes.

`reference_pack` below is the stage as a plain loop (every token in memory, one process), kept here as the
specification: the shards and index.json of pack_jsonl must be byte-identical to its output whatever the
number of workers and however the rows are cut into chunks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sftflow.packing import pack_jsonl
from sftflow.packing import pipeline as packing_pipeline
from sftflow.packing import shards as packing_shards
from sftflow.packing.tokenize import tokenize_rows
from tests.conftest import write_jsonl
from tests.packing.conftest import EOT, make_rows


def reference_pack(rows: list[dict], out: Path, tok, cfg: dict, source: str) -> None:
    """Tokenize every row in memory, apply packing.overlong, drop rows without predictable loss tokens, and
    write the kept sequences in row order, sequences_per_shard per shard, one per bin."""
    L = cfg["max_total_sequence_length"]
    seqs = []
    for row, (_, ids, mask) in zip(rows, tokenize_rows(tok, [("x", r) for r in rows]), strict=True):
        masked = False
        if len(ids) > L:
            if cfg["overlong"] == "drop":
                continue
            if cfg["overlong"] == "mask":  # start_sft.py: min(4, L // m) tokens per message, loss multiplier 0
                m = len(row["messages"]) if "messages" in row else 2
                keep = max(1, min(4, L // m) * m)
                ids, mask, masked = ids[:keep], np.zeros(keep, np.uint8), True
            else:
                ids, mask = ids[:L], mask[:L]
        if masked or mask[1:].any():
            seqs.append((ids, mask))
    out.mkdir()
    shards = []
    per_shard = cfg["sequences_per_shard"]
    for k, first in enumerate(range(0, len(seqs), per_shard)):
        members = seqs[first : first + per_shard]
        tokens = np.concatenate([ids for ids, _ in members]).astype(np.int32)
        mask = np.concatenate([m for _, m in members]).astype(np.uint8)
        cu = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in members])]).astype(np.int64)
        predictable = int(sum(int(m[1:].sum()) for _, m in members))
        name = f"shard_{k:05d}.safetensors"
        tensors = {"tokens": tokens, "loss_mask": mask, "cu_seqlens": cu}
        tensors["bin_offsets"] = np.arange(len(members) + 1, dtype=np.int64)
        save_file(tensors, str(out / name), metadata={"format": "sftflow-packed-v2"})
        shards.append(
            {
                "file": name,
                "num_bins": len(members),
                "num_sequences": len(members),
                "num_tokens": len(tokens),
                "num_loss_tokens": predictable,
            }
        )
    index = {
        "format": "sftflow-packed-v2",
        "max_total_sequence_length": L,
        "pad_token_id": tok.pad_token_id,
        "num_bins": len(seqs),
        "num_sequences": len(seqs),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_loss_tokens": sum(s["num_loss_tokens"] for s in shards),
        "shards": shards,
        "tokenizer": str(tok.name_or_path),
        "source": source,
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def fixture_rows() -> list[dict]:
    """Both row shapes, blank lines aside; some rows over-long, some without any predictable loss token."""
    rows = make_rows(150)
    long_answer = " ".join(f"{k} + {k} = {2 * k}." for k in range(40))
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for i in range(0, 150, 17):
        rows[i] = {"input": prompt, "output": long_answer + EOT}  # over-long at L=96
    for i in range(5, 150, 29):
        rows[i] = {"input": "<|im_start|>user\n" + "Hi " * 120, "output": "2" + EOT}  # answer cut off
    rows[7] = {"input": "", "output": "<|im_end|>"}  # its only loss token is the first one
    rows[9] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_answer}] * 2}
    return rows


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "stats.json"}


CONFIGS = [
    {"max_total_sequence_length": 96, "sequences_per_shard": 13},  # overlong: mask
    {"max_total_sequence_length": 96, "sequences_per_shard": 17, "overlong": "truncate", "enabled": False},
    {"max_total_sequence_length": 96, "sequences_per_shard": 9, "overlong": "drop"},
    {"max_total_sequence_length": 128, "sequences_per_shard": 50, "algorithm": "first_fit_decreasing"},
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_streaming_equals_in_memory_reference(tmp_path, demo_tok, monkeypatch, cfg):
    rows = fixture_rows()
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    src.write_text(src.read_text().replace("\n", "\n\n", 3))  # blank lines are skipped, as before
    full = asdict(packing_pipeline.PackingConfig.from_section(cfg))
    reference_pack(rows, tmp_path / "reference", demo_tok, full, str(src))
    expected = files_of(tmp_path / "reference")
    assert len(expected) > 3  # several shards

    monkeypatch.setattr(packing_pipeline, "CHUNK_ROWS", 11)  # many chunks, so workers interleave
    monkeypatch.setattr(packing_shards, "WRITE_BLOCK_SEQUENCES", 3)  # shards written in many blocks
    stats = {}
    for workers in (1, 2, 3):
        stats[workers] = pack_jsonl(src, tmp_path / f"w{workers}", demo_tok, cfg | {"num_workers": workers})
        assert files_of(tmp_path / f"w{workers}") == expected, f"{workers} worker(s)"
    for s in stats.values():
        s.pop("seconds")
        s.pop("num_workers")
    assert stats[1] == stats[2] == stats[3]
    dropped, overlong = stats[1]["dropped"], stats[1]["overlong"]
    assert dropped["no_loss_tokens"] >= 1 and overlong["count"] >= 10
    assert overlong["masked"] == (overlong["count"] if overlong["action"] == "mask" else 0)
    assert stats[1]["rows_read"] == 150
    assert stats[1]["sequences_kept"] + dropped["overlong"] + dropped["no_loss_tokens"] == 150


def test_first_bad_line_is_reported_whatever_the_workers(tmp_path, demo_tok, monkeypatch):
    monkeypatch.setattr(packing_pipeline, "CHUNK_ROWS", 4)
    lines = [json.dumps(r) for r in make_rows(40)]
    lines[13] = '{"input": "q", "output": ""}'
    lines[30] = "{not json"
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(Exception, match=r"sft.jsonl:14: 'output' is empty"):
            pack_jsonl(src, tmp_path / "packed", demo_tok, {"num_workers": workers})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]  # nothing left behind


def test_automatic_workers_follow_the_cores_and_the_rules_threads(tmp_path, monkeypatch):
    """packing.num_workers null: one worker per core this process may use, capped by the rule's threads
    (`cores`), and one for a small input; a number in the config is taken as given."""
    monkeypatch.setattr(packing_pipeline, "available_cpus", lambda: 4)
    monkeypatch.setattr(packing_pipeline, "PARALLEL_MIN_BYTES", 10)
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    big.write_text("x" * 100)
    small.write_text("x")
    auto = packing_pipeline.PackingConfig.from_section({"num_workers": None})
    assert packing_pipeline._num_workers(auto, big) == 4
    assert packing_pipeline._num_workers(auto, big, cores=2) == 2
    assert packing_pipeline._num_workers(auto, big, cores=16) == 4
    assert packing_pipeline._num_workers(auto, small, cores=2) == 1
    assert (
        packing_pipeline._num_workers(packing_pipeline.PackingConfig.from_section({"num_workers": 3}), small, cores=2)
        == 3
    )
    # The pack_data rule decides the count up front (PackingConfig.with_workers), pack_jsonl then takes it as given.
    assert auto.with_workers(big, cores=2).num_workers == 2
    assert auto.with_workers(small, cores=2).num_workers == 1
    assert auto.with_workers(big, cores=2).overlong == auto.overlong and auto.num_workers is None


def test_spool_parts_read_back_in_input_order(tmp_path, monkeypatch):
    """Each process appends to its own spool part; sequences are read by their offset in input order,
    whichever part holds them and however the reads mix parts."""
    from sftflow.packing import stream
    from sftflow.packing.shards import ArraySequences

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=60)
    tokens = rng.integers(0, 50_000, size=int(lengths.sum())).astype(np.int32)
    mask = rng.integers(0, 2, size=len(tokens)).astype(np.uint8)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    spool = stream.TokenSpool(tmp_path / "spool")
    first = 0
    for k, size in enumerate([7, 0, 13, 1, 20, 19]):  # chunks of sequences, one empty, over three "processes"
        monkeypatch.setattr(stream.os, "getpid", lambda k=k: 1000 + k % 3)
        a, b = bounds[first], bounds[first + size]
        part, offset = spool.append(tokens[a:b], mask[a:b]) if size else ("", 0)
        spool.add_chunk(part, offset, int(b - a))
        first += size
    monkeypatch.undo()
    spool.close()
    monkeypatch.setattr(stream, "READ_SEQUENCES", 4)  # each read maps the parts several times
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [
        f"part-{pid}.{field}" for pid in (1000, 1001, 1002) for field in ("loss_mask", "tokens")
    ]
    expected = ArraySequences(tokens, mask)
    for picked in (rng.permutation(60), np.array([59, 0]), np.array([8, 9, 10])):
        starts, n = bounds[picked], lengths[picked]
        for field in ("tokens", "loss_mask"):
            assert (spool.read(field, starts, n) == expected.read(field, starts, n)).all()
