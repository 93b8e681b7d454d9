"""pack_jsonl end to end: one sequence per bin in input order, shard round-trip, over-long handling (mask, truncate,
drop), zero-loss drops, the v1 refusal, errors, CLI and determinism."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sftflow.errors import SftflowError
from sftflow.packing import FORMAT, PackedDataset, collate_bins, pack_jsonl
from sftflow.packing.cli import main
from sftflow.packing.tokenize import tokenize_rows
from tests.conftest import REPO, write_jsonl
from tests.packing.conftest import EOT, make_rows

STATS_KEYS = {
    "source",
    "tokenizer",
    "max_total_sequence_length",
    "rows_read",
    "sequences_kept",
    "overlong",
    "dropped",
    "shards",
    "total_tokens",
    "loss_tokens",
    "mean_sequence_length",
    "max_sequence_length",
    "num_workers",
    "seconds",
}


def sequences_of(ds: PackedDataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every sequence of `ds` as (ids, loss mask), in the dataset's order; checks each bin holds one."""
    seqs = []
    for i in range(len(ds)):
        b = ds.get_bin(i)
        assert b["seq_lens"] == [len(b["input_ids"])] and len(b["input_ids"]) <= ds.index["max_total_sequence_length"]
        assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.bool
        seqs.append((tuple(b["input_ids"].tolist()), tuple(b["loss_mask"].int().tolist())))
    return seqs


def tokenized(tok, rows: list[dict]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(ids.tolist()), tuple(m.tolist())) for _, ids, m in tokenize_rows(tok, [("x", r) for r in rows])]


@pytest.mark.parametrize("enabled", [True, False])
def test_round_trip_one_sequence_per_bin_in_input_order(tmp_path, demo_tok, enabled):
    rows = make_rows(120)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    expected = tokenized(demo_tok, rows)
    cfg = {"enabled": enabled, "max_total_sequence_length": 256, "sequences_per_shard": 7}
    stats = pack_jsonl(src, tmp_path / "packed", demo_tok, cfg)

    ds = PackedDataset(tmp_path / "packed")
    idx = ds.index
    assert idx["format"] == FORMAT == "sftflow-packed-v2" and idx["source"] == str(src)
    assert idx["pad_token_id"] == demo_tok.pad_token_id
    assert sequences_of(ds) == expected  # every sequence exactly once, intact, in the file's row order
    assert idx["num_sequences"] == idx["num_bins"] == len(ds) == ds.num_sequences == stats["sequences_kept"] == 120
    assert [s["num_sequences"] for s in idx["shards"]] == [s["num_bins"] for s in idx["shards"]] == [7] * 17 + [1]
    assert idx["num_tokens"] == stats["total_tokens"] == sum(len(s[0]) for s in expected)
    assert set(stats) == STATS_KEYS and stats["shards"] == 18
    assert "packing" not in stats and "algorithm" not in stats  # the trainer's keys: pack_data's output ignores them

    # Raw shard tensors follow the documented contract.
    shard = load_file(str(tmp_path / "packed" / idx["shards"][1]["file"]))
    assert shard["tokens"].dtype == torch.int32 and shard["loss_mask"].dtype == torch.uint8
    assert shard["cu_seqlens"].dtype == shard["bin_offsets"].dtype == torch.int64
    assert shard["cu_seqlens"][0] == 0 and shard["cu_seqlens"][-1] == len(shard["tokens"])
    assert shard["bin_offsets"].tolist() == list(range(8))
    assert shard["tokens"].tolist() == [t for ids, _ in expected[7:14] for t in ids]

    # index.num_loss_tokens is exactly what the trainer's collate will count.
    L = idx["max_total_sequence_length"]
    counted = sum(collate_bins([ds[i]], L, idx["pad_token_id"])["num_loss_tokens"] for i in range(len(ds)))
    assert counted == idx["num_loss_tokens"] == stats["loss_tokens"]
    assert ds[-1]["seq_lens"] == ds.get_bin(len(ds) - 1)["seq_lens"]
    clone = pickle.loads(pickle.dumps(ds))  # what spawned DataLoader workers receive
    assert torch.equal(clone[3]["input_ids"], ds[3]["input_ids"])
    with pytest.raises(IndexError):
        ds.get_bin(len(ds))


def test_lengths_are_every_sequence_length_in_order(tmp_path, demo_tok):
    rows = make_rows(50)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    pack_jsonl(src, tmp_path / "packed", demo_tok, {"max_total_sequence_length": 256, "sequences_per_shard": 4})
    ds = PackedDataset(tmp_path / "packed")
    lengths = ds.lengths()
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(ids) for ids, _ in tokenized(demo_tok, rows)]
    assert lengths.tolist() == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert len(set(lengths.tolist())) > 5  # varied lengths: a sorted or packed order would not match
    assert ds.lengths() is lengths and not lengths.flags.writeable  # computed once, not changeable by callers
    assert pickle.loads(pickle.dumps(ds)).lengths().tolist() == lengths.tolist()


def test_kept_sequences_keep_the_input_order_around_dropped_rows(tmp_path, demo_tok):
    rows = make_rows(30)
    rows[4] = {"input": "", "output": "<|im_end|>"}  # no predictable loss token: dropped
    rows[9] = {"input": "q", "output": " ".join(["1 + 1 = 2."] * 100) + EOT}  # over-long: dropped
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(src, tmp_path / "p", demo_tok, {"max_total_sequence_length": 256, "overlong": "drop"})
    assert stats["sequences_kept"] == 28 and stats["dropped"]["overlong"] == stats["dropped"]["no_loss_tokens"] == 1
    assert sequences_of(PackedDataset(tmp_path / "p")) == tokenized(demo_tok, rows[:4] + rows[5:9] + rows[10:])


def test_same_input_same_bytes(tmp_path, demo_tok):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(80))
    for name in "ab":
        pack_jsonl(src, tmp_path / name, demo_tok, {"max_total_sequence_length": 256, "sequences_per_shard": 1000})
    a, b = (load_file(str(tmp_path / n / "shard_00000.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_v1_directory_is_refused_with_the_reason(tmp_path, demo_tok):
    src = write_jsonl(tmp_path / "sft.jsonl", make_rows(10))
    pack_jsonl(src, tmp_path / "packed", demo_tok, {"max_total_sequence_length": 256})
    index_file = tmp_path / "packed" / "index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(index | {"format": "sftflow-packed-v1"}))
    with pytest.raises(SftflowError) as err:
        PackedDataset(tmp_path / "packed")
    message = str(err.value)
    assert message.startswith(f"{index_file}: format 'sftflow-packed-v1' is not 'sftflow-packed-v2'")
    assert "re-run pack_data" in message and "packs each step" in message
    index_file.write_text(json.dumps(index | {"format": "something-else"}))
    with pytest.raises(SftflowError, match="format 'something-else' is not 'sftflow-packed-v2'; re-run pack_data"):
        PackedDataset(tmp_path / "packed")


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
        "masked": 0,
        "tokens_truncated": lens[1] + lens[2] - 2 * L,
        "tokens_dropped": 0,
        "tokens_masked": 0,
    }
    assert stats["dropped"] == {"overlong": 0, "no_loss_tokens": 1, "no_loss_tokens_after_truncation": 1}
    assert stats["max_sequence_length"] == L and stats["total_tokens"] == lens[0] + L
    full = tokenized(demo_tok, rows)
    # The short row as it is, then the long answer's first L tokens, still trained on.
    assert sequences_of(PackedDataset(tmp_path / "p")) == [full[0], (full[1][0][:L], full[1][1][:L])]
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
        "masked": 0,
        "tokens_truncated": 0,
        "tokens_dropped": lens[1] + lens[2],
        "tokens_masked": 0,
    }
    assert stats["dropped"] == {"overlong": 2, "no_loss_tokens": 0, "no_loss_tokens_after_truncation": 0}


def test_mask_is_the_default_and_keeps_a_masked_row_without_loss_tokens(tmp_path, demo_tok):
    # Truncating the long-prompt row leaves it no loss token (dropped above); masked, it is kept on purpose.
    rows, lens = long_rows(demo_tok)
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(src, tmp_path / "p", demo_tok, {"max_total_sequence_length": 40})
    k = min(4, 40 // 2) * 2  # an input/output row is 2 messages
    assert stats["sequences_kept"] == 3 and stats["total_tokens"] == lens[0] + 2 * k
    assert stats["overlong"] == {
        "count": 2,
        "action": "mask",
        "masked": 2,
        "tokens_truncated": 0,
        "tokens_dropped": 0,
        "tokens_masked": lens[1] + lens[2] - 2 * k,
    }
    assert stats["dropped"] == {"overlong": 0, "no_loss_tokens": 0, "no_loss_tokens_after_truncation": 0}
    full = tokenized(demo_tok, rows)
    assert sequences_of(PackedDataset(tmp_path / "p")) == [full[0]] + [(ids[:k], (0,) * k) for ids, _ in full[1:]]
    assert stats["loss_tokens"] == sum(full[0][1][1:])  # only the short row is trained on


def test_one_overlong_row_in_eight_is_masked_and_counted(tmp_path, demo_tok, caplog):
    rows = make_rows(8)
    assert "messages" in rows[6]
    rows[6]["messages"] = [
        {"role": "user", "content": "Problem 6"},
        {"role": "assistant", "content": " ".join(f"{k} + {k} = {2 * k}." for k in range(60))},
        {"role": "user", "content": "Thanks"},
    ]
    src = write_jsonl(tmp_path / "sft.jsonl", rows)
    L = 120
    full = tokenized(demo_tok, rows)
    assert [len(ids) > L for ids, _ in full] == [False] * 6 + [True, False]
    with caplog.at_level("INFO", logger="sftflow.packing"):
        stats = pack_jsonl(src, tmp_path / "p", demo_tok, {"max_total_sequence_length": L})
    k = min(4, L // 3) * 3  # the conversation has 3 messages
    ds = PackedDataset(tmp_path / "p")
    seqs = sequences_of(ds)
    assert len(ds) == stats["sequences_kept"] == 8
    assert seqs[:6] + seqs[7:] == full[:6] + full[7:]
    assert seqs[6] == (full[6][0][:k], (0,) * k) and ds.lengths()[6] == k == 12
    assert stats["overlong"]["masked"] == stats["overlong"]["count"] == 1
    assert stats["overlong"]["tokens_masked"] == len(full[6][0]) - k
    assert stats["loss_tokens"] == sum(sum(m[1:]) for _, m in full[:6] + full[7:])
    assert json.loads((tmp_path / "p" / "stats.json").read_text())["overlong"] == stats["overlong"]
    assert f"over-long (> 120 tokens): 1 (mask: 1 kept as sequences with no loss tokens, {len(full[6][0]) - k} " in (
        caplog.text
    )


def test_masked_length_follows_start_sft():
    from sftflow.packing.stream import masked_length

    # min(4, max_len // m) tokens per message, m messages; never empty.
    assert masked_length(np.array([2, 3, 4, 5, 20]), 8).tolist() == [8, 6, 8, 5, 1]
    assert masked_length(np.array([2, 7]), 4096).tolist() == [8, 28]


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


def test_only_masked_sequences_is_an_error(tmp_path, demo_tok):
    rows, _ = long_rows(demo_tok)
    src = write_jsonl(tmp_path / "sft.jsonl", rows[1:])
    with pytest.raises(SftflowError, match="no loss token left to train on: all 2 sequences kept were over-long"):
        pack_jsonl(src, tmp_path / "packed", demo_tok, {"max_total_sequence_length": 40})
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
    pack_jsonl(src, tmp_path / "packed", demo_tok, {"sequences_per_shard": 2})
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
            "--max-total-sequence-length",
            "256",
            "--overlong",
            "drop",
            "--sequences-per-shard",
            "6",
        ]
    )
    assert rc == 0
    idx = json.loads((out / "index.json").read_text())
    assert idx["num_sequences"] == 20 and len(idx["shards"]) == 4 and idx["max_total_sequence_length"] == 256
    stats = json.loads((out / "stats.json").read_text())
    assert stats["overlong"]["action"] == "drop"
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
    assert "the trainer packs each step's sequences (packing.enabled, packing.algorithm)" in proc.stderr


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


def test_schema_and_cli_list_the_overlong_actions_and_packing_keys():
    from sftflow.config import load_schema
    from sftflow.packing.binpack import ALGORITHMS
    from sftflow.packing.cli import parser
    from sftflow.packing.pipeline import PackingConfig
    from sftflow.packing.stream import OVERLONG

    section = load_schema()["properties"]["packing"]["properties"]
    assert tuple(section["overlong"]["enum"]) == OVERLONG and section["overlong"]["default"] == "mask"
    assert tuple(section["algorithm"]["enum"]) == ALGORITHMS
    assert section["max_total_sequence_length"]["default"] == 4096  # NeMo-Skills' policy.max_total_sequence_length
    assert set(section) == set(PackingConfig.__dataclass_fields__)
    assert "seed" not in section and "bins_per_shard" not in section
    with pytest.raises(SftflowError, match="packing"):
        PackingConfig.from_section({"bins_per_shard": 10})
    options = {a.dest: a for a in parser()._actions}
    assert tuple(options["overlong"].choices) == OVERLONG and "seed" not in options
