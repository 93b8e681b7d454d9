"""pack_jsonl end to end: shard round-trip, over-long handling, zero-loss drops, errors, CLI and determinism."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftflow.errors import SftflowError
from sftflow.packing import FORMAT, PackedDataset, collate_bins, pack_jsonl
from sftflow.packing.cli import main
from sftflow.packing.tokenize import tokenize_rows
from tests.conftest import REPO, write_jsonl
from tests.packing.conftest import EOT, make_rows


def sequences_of(ds: PackedDataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    seqs = []
    for i in range(len(ds)):
        b = ds.get_bin(i)
        assert sum(b["seq_lens"]) == len(b["input_ids"]) <= ds.index["max_total_sequence_length"]
        assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.bool
        start = 0
        for n in b["seq_lens"]:
            seqs.append(
                (
                    tuple(b["input_ids"][start : start + n].tolist()),
                    tuple(b["loss_mask"][start : start + n].int().tolist()),
                )
            )
            start += n
    return seqs


@pytest.mark.parametrize("enabled", [True, False])
def test_round_trip(tmp_path, demo_tok, enabled):
    rows = make_rows(120)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    expected = [
        (tuple(ids.tolist()), tuple(m.tolist())) for _, ids, m in tokenize_rows(demo_tok, [("x", r) for r in rows])
    ]
    cfg = {"enabled": enabled, "max_total_sequence_length": 256, "bins_per_shard": 7}
    stats = pack_jsonl(src, tmp_path / "packed", demo_tok, cfg)

    ds = PackedDataset(tmp_path / "packed")
    idx = ds.index
    assert idx["format"] == FORMAT and idx["packing"] is enabled and idx["source"] == str(src)
    assert idx["pad_token_id"] == demo_tok.pad_token_id
    assert Counter(sequences_of(ds)) == Counter(expected)  # every sequence exactly once, intact
    assert idx["num_sequences"] == stats["sequences_kept"] == 120
    assert idx["num_bins"] == len(ds) == stats["bins"] == sum(s["num_bins"] for s in idx["shards"])
    assert idx["num_tokens"] == stats["total_tokens"] == sum(len(s[0]) for s in expected)
    assert len(idx["shards"]) == -(-len(ds) // 7)
    if not enabled:
        assert len(ds) == 120 and all(len(ds[i]["seq_lens"]) == 1 for i in range(len(ds)))
    else:
        assert len(ds) < 60 and stats["fill_ratio"] > 0.8
        assert stats["lower_bound_bins"] <= len(ds)

    # Raw shard tensors follow the documented contract.
    shard = load_file(str(tmp_path / "packed" / idx["shards"][0]["file"]))
    assert shard["tokens"].dtype == torch.int32 and shard["loss_mask"].dtype == torch.uint8
    assert shard["cu_seqlens"].dtype == shard["bin_offsets"].dtype == torch.int64
    assert shard["cu_seqlens"][0] == 0 and shard["cu_seqlens"][-1] == len(shard["tokens"])
    assert shard["bin_offsets"][0] == 0 and shard["bin_offsets"][-1] == len(shard["cu_seqlens"]) - 1
    assert len(shard["bin_offsets"]) == 8

    # index.num_loss_tokens is exactly what the trainer's collate will count.
    L = idx["max_total_sequence_length"]
    counted = sum(collate_bins([ds[i]], L, idx["pad_token_id"])["num_loss_tokens"] for i in range(len(ds)))
    assert counted == idx["num_loss_tokens"] == stats["loss_tokens"]
    assert ds[-1]["seq_lens"] == ds.get_bin(len(ds) - 1)["seq_lens"]
    clone = pickle.loads(pickle.dumps(ds))  # what spawned DataLoader workers receive
    assert torch.equal(clone[3]["input_ids"], ds[3]["input_ids"])
    with pytest.raises(IndexError):
        ds.get_bin(len(ds))


def test_deterministic_and_seeded_bin_order(tmp_path, demo_tok):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(80))
    cfg = {"max_total_sequence_length": 256, "bins_per_shard": 1000}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        pack_jsonl(src, tmp_path / name, demo_tok, cfg | {"seed": seed})
    a, b, c = (load_file(str(tmp_path / n / "shard_00000.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tokens"], c["tokens"])  # another bin order...
    assert Counter(sequences_of(PackedDataset(tmp_path / "a"))) == Counter(sequences_of(PackedDataset(tmp_path / "c")))


def long_rows(demo_tok):
    short = {"input": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "output": "1 + 1 = 2." + EOT}
    long_answer = {"input": short["input"], "output": " ".join(["1 + 1 = 2."] * 20) + EOT}
    long_prompt = {
        "input": "<|im_start|>user\n" + "Hi " * 80 + "<|im_end|>\n<|im_start|>assistant\n",
        "output": "2" + EOT,
    }
    lens = [
        sum(len(demo_tok(r[k], add_special_tokens=False).input_ids) for k in ("input", "output"))
        for r in (short, long_answer, long_prompt)
    ]
    return [short, long_answer, long_prompt], lens


def test_truncate_counts_and_drops_zero_loss(tmp_path, demo_tok):
    rows, lens = long_rows(demo_tok)
    L = 40
    assert lens[0] <= L < lens[1] and L < lens[2]
    n_prompt = len(demo_tok(rows[2]["input"], add_special_tokens=False).input_ids)
    assert n_prompt > L  # truncation cuts the long-prompt row's whole answer
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(src, tmp_path / "p", demo_tok, {"max_total_sequence_length": L, "overlong": "truncate"})
    assert stats["rows_read"] == 3 and stats["sequences_kept"] == 2
    assert stats["overlong"] == {
        "count": 2,
        "action": "truncate",
        "tokens_truncated": lens[1] + lens[2] - 2 * L,
        "tokens_dropped": 0,
    }
    assert stats["dropped"] == {"overlong": 0, "no_loss_tokens": 1, "no_loss_tokens_after_truncation": 1}
    assert stats["max_sequence_length"] == L and stats["total_tokens"] == lens[0] + L
    kept = sorted(len(s[0]) for s in sequences_of(PackedDataset(tmp_path / "p")))
    assert kept == sorted([lens[0], L])
    on_disk = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert on_disk["dropped"] == stats["dropped"]


def test_drop_counts(tmp_path, demo_tok):
    rows, lens = long_rows(demo_tok)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(src, tmp_path / "p", demo_tok, {"max_total_sequence_length": 40, "overlong": "drop"})
    assert stats["sequences_kept"] == 1 and stats["total_tokens"] == lens[0]
    assert stats["overlong"] == {
        "count": 2,
        "action": "drop",
        "tokens_truncated": 0,
        "tokens_dropped": lens[1] + lens[2],
    }
    assert stats["dropped"] == {"overlong": 2, "no_loss_tokens": 0, "no_loss_tokens_after_truncation": 0}


def no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".packed")] + [
        p.name for p in directory.glob("packed")
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"input": "q", "output": ""}', "'output' is empty"),
        ('{"question": "q"}', "row is neither an input/output row"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_input_names_line_and_leaves_nothing(tmp_path, demo_tok, bad_line, message):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(2))
    src.write_text(src.read_text() + bad_line + "\n")
    with pytest.raises(SftflowError, match=f"sft.jsonl:3: {message}"):
        pack_jsonl(src, tmp_path / "packed", demo_tok, {})
    assert no_leftovers(tmp_path) == []


def test_everything_dropped_is_an_error(tmp_path, demo_tok):
    rows, _ = long_rows(demo_tok)
    src = write_jsonl(tmp_path / "sft.jsonl", rows[1:])
    with pytest.raises(SftflowError, match="no sequence left"):
        pack_jsonl(src, tmp_path / "packed", demo_tok, {"max_total_sequence_length": 8, "overlong": "drop"})
    assert no_leftovers(tmp_path) == []


def test_bad_config_names_key(tmp_path, demo_tok):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(2))
    with pytest.raises(SftflowError, match="packing.algorithm"):
        pack_jsonl(src, tmp_path / "packed", demo_tok, {"algorithm": "next_fit"})
    with pytest.raises(SftflowError, match="packing.max_total_seq"):
        pack_jsonl(src, tmp_path / "packed", demo_tok, {"max_total_seq_length": 10})


def test_existing_output_is_replaced_atomically(tmp_path, demo_tok):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(30))
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "stale.txt").write_text("old")
    pack_jsonl(src, tmp_path / "packed", demo_tok, {"bins_per_shard": 2})
    assert not (tmp_path / "packed" / "stale.txt").exists()
    assert (tmp_path / "packed" / "stats.json").is_file()


def test_cli_in_process(tmp_path, demo_tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(20))
    out = tmp_path / "packed"
    rc = main(
        [
            "--input",
            str(src),
            "--tokenizer",
            str(demo_tokenizer_dir),
            "--output",
            str(out),
            "--no-packing",
            "--max-total-sequence-length",
            "256",
            "--overlong",
            "drop",
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    idx = json.loads((out / "index.json").read_text())
    assert idx["packing"] is False and idx["num_bins"] == 20 and idx["max_total_sequence_length"] == 256
    assert idx["tokenizer"] == str(demo_tokenizer_dir)
    assert (
        main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(demo_tokenizer_dir), "--output", str(out)])
        == 2
    )
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_cli_script_with_chat_template(tmp_path, demo_tokenizer_dir):
    # Runs scripts/pack_data.py as the user would; the replacement template must be used for messages rows.
    template = tmp_path / "t.jinja"
    template.write_text(
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + ':' + m['content'] + '<|im_end|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant:' -}}{%- endif -%}"
    )
    src = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}]}],
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pack_data.py"),
            "--input",
            str(src),
            "--tokenizer",
            str(demo_tokenizer_dir),
            "--output",
            str(tmp_path / "packed"),
            "--chat-template",
            str(template),
            "--algorithm",
            "first_fit_decreasing",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ds = PackedDataset(tmp_path / "packed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    b = ds[0]
    assert tok.decode(b["input_ids"].tolist()) == "<|im_start|>user:q<|im_end|><|im_start|>assistant:a b c<|im_end|>"
    assert tok.decode(b["input_ids"][b["loss_mask"]].tolist()) == "a b c<|im_end|>"
    assert "packed with first_fit_decreasing" in proc.stderr


def test_not_a_packed_dir(tmp_path):
    with pytest.raises(SftflowError, match="no index.json"):
        PackedDataset(tmp_path)


def test_loss_only_on_first_token_is_dropped(tmp_path, demo_tok):
    # Empty prompt + one-token answer: the only loss token is position 0, which nothing can predict.
    rows = [{"input": "", "output": "<|im_end|>"}, {"input": "q", "output": "a b" + EOT}]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(src, tmp_path / "p", demo_tok, {})
    assert stats["sequences_kept"] == 1
    assert stats["dropped"] == {"overlong": 0, "no_loss_tokens": 1, "no_loss_tokens_after_truncation": 0}
