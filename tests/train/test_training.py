"""The training step in one process: loss normalisation, the loss definition, resume bookkeeping, deadlines."""

from __future__ import annotations

import json

import pytest
import torch

from sftflow.errors import SftflowError
from tests.train.conftest import assert_weights_close, final_weights, logged, make_packed, run_inprocess


@pytest.fixture(scope="module")
def reference_1x8(tmp_path_factory, world1, packed, tiny_model):
    """4 steps of a global batch of 8 sequences in one micro-batch of 8 bins."""
    ckpt = tmp_path_factory.mktemp("ref") / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, train_micro_batch_size=8, max_num_steps=4)
    return ckpt


@pytest.mark.parametrize("micro", [1, 4])
def test_loss_and_update_do_not_depend_on_the_split_into_micro_batches(
    micro, tmp_path, world1, packed, tiny_model, reference_1x8
):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, train_micro_batch_size=micro, max_num_steps=4)
    ref_loss, loss = logged(reference_1x8), logged(ckpt)
    assert ref_loss.keys() == loss.keys() == {1, 2, 3, 4}
    for step in ref_loss:
        assert loss[step] == pytest.approx(ref_loss[step], rel=1e-6)
    assert_weights_close(final_weights(ckpt), final_weights(reference_1x8))


def test_logged_loss_is_the_token_mean_over_the_global_batch(world1, packed, tiny_model, reference_1x8):
    """Step 1's loss, recomputed with the plain HF model on the same 8 sequences, one at a time."""
    from transformers import AutoModelForCausalLM

    from sftflow.packing import PackedDataset
    from sftflow.train.data import epoch_permutation
    from tests.train.conftest import training_config

    cfg = training_config(train_micro_batch_size=8, max_num_steps=4)["training"]
    dataset = PackedDataset(packed)
    ids = epoch_permutation(len(dataset), cfg["seed"], epoch=0)[:8]  # step 1: the first 8 sequences of epoch 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    total, count = 0.0, 0
    for i in ids:
        b = dataset.get_bin(i)
        start = 0
        for n in b["seq_lens"]:
            tokens, mask = b["input_ids"][start : start + n], b["loss_mask"][start : start + n]
            start += n
            with torch.no_grad():
                logits = model(input_ids=tokens[None], use_cache=False).logits[0]
            targets = torch.where(mask[1:], tokens[1:], -100)
            total += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
            count += int((targets != -100).sum())
    assert logged(reference_1x8)[1] == pytest.approx(total / count, rel=1e-5)
    assert logged(reference_1x8, "loss_tokens")[1] == count


def test_activation_checkpointing_gives_the_same_weights(tmp_path, world1, packed, tiny_model, reference_1x8):
    ckpt = tmp_path / "ckpt"
    run_inprocess(
        world1, ckpt, packed, tiny_model, train_micro_batch_size=8, max_num_steps=4, activation_checkpointing=True
    )
    assert_weights_close(final_weights(ckpt), final_weights(reference_1x8), atol=1e-6)


def test_raising_max_num_steps_continues_without_redoing_steps(tmp_path, world1, packed, tiny_model):
    ckpt = tmp_path / "ckpt"
    first = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=2)
    assert (first["start_step"], first["end_step"], first["complete"]) == (0, 2, True)
    second = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=4)
    assert (second["start_step"], second["end_step"], second["total_steps"]) == (2, 4, 4)
    # metrics.jsonl: one row per step, steps 3-4 from the second run only
    assert sorted(logged(ckpt)) == [1, 2, 3, 4]


def test_a_job_whose_target_is_already_checkpointed_only_writes_its_done_file(tmp_path, world1, packed, tiny_model):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=4)
    saved = sorted(p.name for p in ckpt.glob("step_*"))
    record = run_inprocess(world1, ckpt, packed, tiny_model, job=0, jobs=2, max_num_steps=4)
    assert (record["start_step"], record["end_step"], record["target_step"], record["complete"]) == (4, 4, 2, True)
    assert json.loads((ckpt / "job0.done").read_text()) == record
    assert sorted(p.name for p in ckpt.glob("step_*")) == saved


def test_fewer_sequences_than_one_global_batch_is_an_error_naming_the_numbers(tmp_path, world1, tiny_model):
    small = make_packed(tmp_path / "small", num_sequences=6)
    with pytest.raises(SftflowError, match=r"packed data has 6 sequences, .*train_global_batch_size' = 8 sequences"):
        run_inprocess(world1, tmp_path / "ckpt", small, tiny_model)


def test_resuming_on_different_packed_data_is_refused(tmp_path, world1, packed, tiny_model):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=2)
    other = make_packed(tmp_path / "other", seed=1)
    with pytest.raises(SftflowError, match="different packed data"):
        run_inprocess(world1, ckpt, other, tiny_model, max_num_steps=4)


class FakeClock:
    """Wall clock that advances 100 s every time it is read."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 100.0
        return self.now


def test_job_stops_before_the_deadline_saves_and_reports_incomplete(tmp_path, world1, packed, tiny_model):
    from sftflow.config import validate_sections
    from sftflow.train.trainer import JobSpec, Trainer
    from tests.train.conftest import training_config

    ckpt = tmp_path / "ckpt"
    cfg = validate_sections(training_config(max_num_steps=10, time_limit="00:10:00", time_margin_seconds=0))
    spec = JobSpec(
        packed=str(packed), model=str(tiny_model), checkpoint_dir=str(ckpt), done_file=str(ckpt / "job0.done")
    )
    # start = t0+100, deadline = t0+700; the check before step k reads t0+100(k+1): steps 1-5 fit.
    record = Trainer(cfg, spec, parallel=world1, clock=FakeClock()).train()
    assert (record.end_step, record.complete, record.remaining_steps) == (5, False, 5)
    assert record.checkpoint.endswith("step_00000005")
    from sftflow.train.export import check_training_complete

    with pytest.raises(SftflowError, match=r"5 steps remain.*training.num_training_jobs.*training.time_limit"):
        check_training_complete(ckpt / "job0.done")
    # the next job (no deadline) continues from step 5
    again = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=10)
    assert (again["start_step"], again["end_step"], again["complete"]) == (5, 10, True)


def test_with_a_deadline_a_job_trains_past_its_share_and_an_unfinished_last_job_fails(
    tmp_path, world1, packed, tiny_model
):
    from sftflow.train.launch import last_job_unfinished

    ckpt = tmp_path / "ckpt"
    # No deadline: job 0 of 3 trains its share, ceil(9 / 3) = 3 steps.
    share = run_inprocess(world1, ckpt, packed, tiny_model, job=0, jobs=3, max_num_steps=9)
    assert (share["start_step"], share["end_step"], share["target_step"]) == (0, 3, 3)
    assert last_job_unfinished(ckpt / "job0.done") is None  # not the last job
    # A deadline far away: job 1 of 3 trains on to the end, and job 2 finds nothing left to do.
    ahead = run_inprocess(world1, ckpt, packed, tiny_model, job=1, jobs=3, max_num_steps=9, time_limit="01:00:00")
    assert (ahead["start_step"], ahead["end_step"], ahead["complete"]) == (3, 9, True)
    last = run_inprocess(world1, ckpt, packed, tiny_model, job=2, jobs=3, max_num_steps=9, time_limit="01:00:00")
    assert (last["start_step"], last["end_step"], last["complete"]) == (9, 9, True)
    assert last_job_unfinished(ckpt / "job2.done") is None

    # The last job stopped by its deadline with steps left: the launcher fails it (Snakemake retries it).
    done = tmp_path / "job1.done"
    done.write_text(json.dumps({**ahead, "job_index": 1, "num_jobs": 2, "end_step": 6, "complete": False,
                                "remaining_steps": 3}))  # fmt: skip
    why = last_job_unfinished(done)
    assert "stopped before its deadline at step 6 of 9 (3 steps remain)" in why
    assert "training.num_training_jobs" in why and "slurm.train_runtime" in why


def test_validation_loss_every_val_period_and_at_the_end(tmp_path, world1, packed, tiny_model):
    import random as pyrandom

    from transformers import AutoModelForCausalLM

    from sftflow.packing import PackedDataset
    from sftflow.train.checkpoint import complete_checkpoints, latest_checkpoint
    from sftflow.train.export import export_checkpoint

    rng = pyrandom.Random(0)
    rows = [
        {
            "input": " ".join(f"w{rng.randrange(3, 300)}" for _ in range(rng.randrange(3, 10))),
            "output": " ".join(f"w{rng.randrange(3, 300)}" for _ in range(rng.randrange(3, 10))),
        }
        for _ in range(11)
    ]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tmp_path / "ckpt"
    # keep_top_k 1 by val_loss (the default metric): the best checkpoint and the newest stay
    run_inprocess(
        world1, ckpt, packed, tiny_model, max_num_steps=5, val_period=2, validation_data=str(val), keep_top_k=1
    )
    val_loss = logged(ckpt, "val_loss")
    assert sorted(val_loss) == [2, 4, 5]
    best = min(val_loss, key=val_loss.get)
    assert [c.step for c in complete_checkpoints(ckpt)] == sorted({best, 5})
    for c in complete_checkpoints(ckpt):  # every save records its step's validation and training loss
        metrics = json.loads((c.path / "meta.json").read_text())["metrics"]
        assert metrics == {"val_loss": val_loss[c.step], "train_loss": logged(ckpt)[c.step]}
    saves = logged(ckpt, "checkpoint_bytes")
    assert sorted(saves) == [2, 4, 5] and min(saves.values()) > 0

    # the final value equals the plain HF model's token-mean loss over every validation sequence
    hf = tmp_path / "hf"
    export_checkpoint(latest_checkpoint(ckpt).path, hf, str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(hf)
    (packed_val,) = ckpt.glob("validation_packed_*")
    data = PackedDataset(packed_val)
    total, count = 0.0, 0
    for i in range(len(data)):
        b = data.get_bin(i)
        start = 0
        for n in b["seq_lens"]:
            tokens, mask = b["input_ids"][start : start + n], b["loss_mask"][start : start + n]
            start += n
            with torch.no_grad():
                logits = model(input_ids=tokens[None]).logits[0]
            targets = torch.where(mask[1:], tokens[1:], -100)
            total += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
            count += int((targets != -100).sum())
    assert count == logged(ckpt, "val_loss_tokens")[5]
    assert val_loss[5] == pytest.approx(total / count, rel=1e-5)


def test_sigusr1_stops_the_job_cleanly_at_the_next_step(tmp_path, world1, packed, tiny_model):
    import os
    import signal

    from sftflow.config import validate_sections
    from sftflow.train.trainer import JobSpec, Trainer
    from tests.train.conftest import training_config

    calls = []

    def clock() -> float:  # read once at start, then once before every step
        calls.append(1)
        if len(calls) == 4:  # before step 3: as if Slurm sent --signal=USR1 now
            os.kill(os.getpid(), signal.SIGUSR1)
        return 1_000.0

    previous = signal.getsignal(signal.SIGUSR1)
    ckpt = tmp_path / "ckpt"
    cfg = validate_sections(training_config(max_num_steps=10, time_limit="100:00:00"))
    spec = JobSpec(packed=str(packed), model=str(tiny_model), checkpoint_dir=str(ckpt), done_file=str(ckpt / "j.done"))
    record = Trainer(cfg, spec, parallel=world1, clock=clock).train()
    assert (record.end_step, record.complete) == (2, False)
    assert record.checkpoint.endswith("step_00000002")
    assert signal.getsignal(signal.SIGUSR1) is previous
