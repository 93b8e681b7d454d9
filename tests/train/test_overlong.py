"""Over-long samples as NeMo-Skills' start_sft.py treats them (packing.overlong: mask, the default): 1 row in 8
is longer than max_total_sequence_length; it stays in its step's sequence count, carries no loss, and is counted
in pack_data's stats and in the step metrics."""

from __future__ import annotations

import json

from sftflow.packing import PackedDataset, pack_jsonl
from tests.conftest import write_jsonl
from tests.train.conftest import SEQ_LEN, metrics_rows, run_inprocess


def test_one_row_in_eight_over_long_is_counted_masked_and_reported(tmp_path, world1, tiny_model):
    def words(start: int, n: int) -> str:
        return " ".join(f"w{3 + (start + k) % 290}" for k in range(n))

    rows = [{"input": words(i, 4), "output": words(7 * i, 90 if i % 8 == 5 else 10)} for i in range(16)]
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    stats = pack_jsonl(source, tmp_path / "packed", str(tiny_model), {"max_total_sequence_length": SEQ_LEN})
    assert stats["sequences_kept"] == 16
    assert (stats["overlong"]["count"], stats["overlong"]["masked"], stats["overlong"]["action"]) == (2, 2, "mask")

    data = PackedDataset(tmp_path / "packed")
    seqs = [data.get_bin(i) for i in range(len(data))]
    masked = [i for i, s in enumerate(seqs) if not s["loss_mask"].any()]
    assert masked == [5, 13]  # in the file's order, the rows that were over-long, and only them
    assert all(len(seqs[i]["input_ids"]) < SEQ_LEN for i in masked)

    ckpt = tmp_path / "ckpt"
    run_inprocess(
        world1, ckpt, tmp_path / "packed", tiny_model, train_global_batch_size=8, max_num_epochs=1, max_num_steps=10
    )
    rows_by_step = metrics_rows(ckpt)
    assert sorted(rows_by_step) == [1, 2]  # 16 sequences, 8 a step: the masked ones count as sequences
    assert all(r["sequences"] == 8 for r in rows_by_step.values())
    assert sum(r["overlong_masked"] for r in rows_by_step.values()) == 2
    # No loss from them: the loss tokens of the epoch are those of the 14 other sequences.
    assert sum(r["loss_tokens"] for r in rows_by_step.values()) == sum(int(s["loss_mask"][1:].sum()) for s in seqs)
    assert json.loads((tmp_path / "packed" / "stats.json").read_text())["overlong"]["masked"] == 2
