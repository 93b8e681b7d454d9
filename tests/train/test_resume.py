"""Exact resume: chained jobs and crashes (SIGKILL mid-run and mid-save) end with bitwise the same weights.

The one uninterrupted job keeps every checkpoint with its optimizer state; the chained and crashed runs keep
two (training.keep_top_k: 2, by step without validation data) plus a protected step, with the optimizer state
in the newest only: retention must neither change what is trained nor remove what a resume reads.

Every run here is a fresh process (as a real chained job is), with OMP_NUM_THREADS=1 so that all of
them use the same floating-point reduction order. The model has attention dropout, so the random
state matters too.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import torch

from sftflow.train.checkpoint import complete_checkpoints, latest_checkpoint
from tests.train.conftest import (
    final_weights,
    logged,
    make_model,
    optimizer_state,
    run_train,
    subprocess_env,
    train_command,
    training_config,
    write_config,
)

STEPS = dict(max_num_steps=8, save_period=2)
KEEP_ALL = dict(keep_top_k=None, keep_optimizer_state="all")
RETAINED = dict(keep_top_k=2, keep_optimizer_state="latest")
PROTECTED = 4  # as if named in average_steps: the workflow lists such steps in train.run.json's protected_steps


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny Llama with attention dropout: resume must also restore every rank's random state."""
    return make_model(tmp_path_factory.mktemp("dropout") / "model", attention_dropout=0.2)


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """The chained and crashed runs' config: retention on."""
    cfg = {**training_config(**STEPS, **RETAINED), "protected_steps": [PROTECTED]}
    return write_config(tmp_path_factory.mktemp("cfg") / "config.json", cfg)


@pytest.fixture(scope="module")
def one_job(tmp_path_factory, packed, tiny_model):
    ckpt = tmp_path_factory.mktemp("one_job") / "ckpt"
    config = write_config(ckpt.parent / "config.json", training_config(**STEPS, **KEEP_ALL))
    run_train(config, packed, tiny_model, ckpt)
    return ckpt


def _with_optimizer(ckpt: Path) -> list[int]:
    return [c.step for c in complete_checkpoints(ckpt) if (c.path / "optimizer").is_dir()]


def _killed(cmd: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run the train command `cmd` through tests/train/crashing_train.py, which SIGKILLs it at `fault`."""
    python, _train_py, *args = cmd
    cmd = [python, str(Path(__file__).with_name("crashing_train.py")), fault, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == -9, f"expected SIGKILL, got {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_three_chained_jobs_end_bitwise_equal_to_one_job(tmp_path, config_file, packed, tiny_model, one_job):
    ckpt = tmp_path / "ckpt"
    for job in range(3):  # targets ceil(8/3)=3, ceil(16/3)=6, 8
        run_train(config_file, packed, tiny_model, ckpt, job=job, jobs=3)
    assert latest_checkpoint(ckpt).step == 8
    # saved 2, 3 | 4, 6 | 8; the last job resumed from 6 after 2 and 3 were removed
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_0000000{s}" for s in (4, 6, 8)]
    assert _with_optimizer(ckpt) == [8] and _with_optimizer(one_job) == [2, 4, 6, 8]
    _assert_bitwise_equal(final_weights(ckpt), final_weights(one_job))
    _assert_bitwise_equal(optimizer_state(ckpt), optimizer_state(one_job))
    assert logged(ckpt) == logged(one_job)  # same loss at every step, logged once per step


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_rerun_ends_bitwise_equal(tmp_path, config_file, packed, tiny_model, one_job):
    ckpt = tmp_path / "ckpt"
    cmd = train_command(config_file, packed, tiny_model, ckpt)
    kill_step = random.Random().randint(1, 5)
    print(f"killing at step {kill_step}")
    _killed(cmd, f"step:{kill_step}")
    latest = latest_checkpoint(ckpt)
    assert (latest.step if latest else 0) == (kill_step - 1) // 2 * 2  # killed before step k was saved
    assert not (ckpt / "job0.done").exists()

    # Second crash: all ranks wrote step 6, but the process dies before the rename commits it.
    _killed(cmd, "save:6")
    assert (ckpt / "step_00000006.tmp" / ".metadata").exists()
    assert latest_checkpoint(ckpt).step == 4  # the torn checkpoint is not picked up
    # retention runs only after a commit: the resume point and its optimizer state are still there
    assert [c.step for c in complete_checkpoints(ckpt)] == [2, 4] and _with_optimizer(ckpt) == [4]

    run_train(config_file, packed, tiny_model, ckpt)
    assert not list(ckpt.glob("*.tmp"))
    assert latest_checkpoint(ckpt).step == 8
    assert [c.step for c in complete_checkpoints(ckpt)] == [4, 6, 8] and _with_optimizer(ckpt) == [8]
    _assert_bitwise_equal(final_weights(ckpt), final_weights(one_job))
    _assert_bitwise_equal(optimizer_state(ckpt), optimizer_state(one_job))
    assert logged(ckpt) == logged(one_job)
