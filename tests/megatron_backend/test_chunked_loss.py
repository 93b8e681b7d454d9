"""training.loss_chunk_tokens with the megatron backend: the loss computed from GPTModel's final hidden states in
chunks of tokens equals the loss of its full logits, with the same gradients, on CPU gloo ranks (cpu_shim.py).

chunked_loss_ranks.py computes, on 2 ranks, each model's loss and gradients from the full logits and through
sftflow.megatron.loss.OutputLayerLoss at several chunk sizes, at TP=2 (vocabulary split over the ranks) and
TP=1, tied and untied embeddings, and an output layer with sequence parallelism against plain torch. The
training test runs the engine at TP=2 x PP=2 with a small chunk size and compares its curve with the fsdp
backend's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.megatron_backend.conftest import STEPS, assert_same_curve, fsdp_job, megatron_job, val_rows
from tests.train.conftest import make_model, subprocess_env

HERE = Path(__file__).resolve().parent
RTOL, ATOL = 1e-5, 1e-6
CHUNKS = [0, 7, 32, 10_000]  # as in chunked_loss_ranks.py


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory, tiny_model) -> list[dict]:
    tmp = tmp_path_factory.mktemp("chunked")
    untied = make_model(tmp / "untied", seed=1, tie=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "chunked_loss_ranks.py"), str(tiny_model), str(untied), str(tmp)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", ["tp2-tied", "tp2-untied", "tp1-tied", "tp1-untied"])
def test_chunked_loss_and_gradients_equal_the_full_logits(rank_results, layout):
    for rank, results in enumerate(rank_results):
        r = results[layout]
        assert r["tied"] == layout.endswith("-tied")
        # tied: no output-layer weight, the embedding takes both gradients
        assert ("output_layer.weight" in r["names"]) == layout.endswith("untied")
        reference = r["logits"]
        assert reference["grads"].keys() == set(r["names"])  # every weight has a gradient
        assert all(g.abs().sum() > 0 for g in reference["grads"].values())
        for chunk in CHUNKS:
            ours = r[f"chunk{chunk}"]
            assert_close(ours["loss"], reference["loss"], f"rank {rank} {layout} chunk {chunk} loss")
            assert_close(r[f"eval{chunk}"]["loss"], reference["loss"], f"rank {rank} {layout} chunk {chunk} eval")
            assert ours["grads"].keys() == reference["grads"].keys()
            for name, grad in reference["grads"].items():
                assert_close(ours["grads"][name], grad, f"rank {rank} {layout} chunk {chunk} {name}")
    # TP ranks hold slices of the vocabulary but the same loss
    assert_close(rank_results[1][layout]["logits"]["loss"], rank_results[0][layout]["logits"]["loss"], "ranks")


def test_the_unchunked_path_is_bitwise_the_full_logits(rank_results):
    for results in rank_results:
        for layout in ("tp2-tied", "tp2-untied", "tp1-tied", "tp1-untied"):
            assert torch.equal(results[layout]["chunk0"]["loss"], results[layout]["logits"]["loss"])


def test_sequence_parallel_chunks_gather_the_right_tokens(rank_results):
    """Each rank holds half the tokens' hidden states; a chunk gathers chunk / 2 tokens of each rank, so its
    labels come from both halves of the micro-batch."""
    for rank, results in enumerate(rank_results):
        r = results["tp2-sequence-parallel"]
        assert r["sequence_parallel"]
        reference = r["reference"]
        for chunk in CHUNKS:
            for key in ("loss", "hidden_grad", "weight_grad"):
                assert_close(r[f"chunk{chunk}"][key], reference[key], f"rank {rank} chunk {chunk} {key}")


def test_automatic_chunking_counts_this_ranks_slice_of_the_vocabulary(rank_results):
    from sftflow.train.loss import loss_chunk_size

    for layout, local_vocab in (("tp2-tied", 256), ("tp1-tied", 384)):  # 300 padded to 128 x TP, over TP
        r = rank_results[0][layout]
        assert r["local_vocab"] == local_vocab
        assert r["automatic"][96] == 0  # the tests' micro-batch: full logits
        assert r["automatic"][10**6] == loss_chunk_size(None, 10**6, local_vocab) > 0


@pytest.mark.slow
def test_training_with_a_chunked_loss_follows_the_fsdp_curve(tmp_path, tiny_model, packed):
    """The engine with chunks of 16 tokens (micro-batches of 128) at TP=2 x PP=2: vocab-parallel chunks on the
    last stage, whose output layer holds its own copy of the tied embedding, under the 1F1B schedule, DDP and
    the distributed optimizer, against the fsdp backend's full logits."""
    val = val_rows(tmp_path / "val.jsonl")
    common = dict(max_num_steps=STEPS, val_period=2, validation_data=str(val))
    fsdp_job(tmp_path, tiny_model, packed, tmp_path / "fsdp", loss_chunk_tokens=0, **common)
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    record = megatron_job(tmp_path, tiny_model, packed, tmp_path / "megatron", 4, loss_chunk_tokens=16, **layout,
                          **common)  # fmt: skip
    assert record["complete"] and record["end_step"] == STEPS
    assert_same_curve(tmp_path / "megatron", tmp_path / "fsdp")
