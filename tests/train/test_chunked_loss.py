"""training.loss_chunk_tokens: the chunked cross-entropy gives the loss and gradients of the full logits."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from tests.train.conftest import (
    PAD_ID,
    SEQ_LEN,
    VOCAB,
    assert_weights_close,
    final_weights,
    logged,
    make_model,
    run_inprocess,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("untied") / "model", seed=1, tie=False)


@pytest.fixture(scope="module")
def batch(packed):
    """Three packed rows (several sequences each, prompt tokens and padding with ignore-index targets)."""
    from sftflow.packing import PackedDataset, collate_bins

    dataset = PackedDataset(packed)
    out = collate_bins([dataset.get_bin(i) for i in range(3)], SEQ_LEN, PAD_ID)
    assert (out["targets"] == -100).any() and out["num_loss_tokens"] > 0
    assert len(out["cu_seqlens"]) > 4  # several sequences
    return out


def _loss_and_grads(model, batch: dict, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from sftflow.train.loss import CHUNKED_LOSS_METHOD, token_loss_sum
    from sftflow.train.model import model_inputs

    model.zero_grad(set_to_none=True)
    inputs, targets = model_inputs(batch, torch.device("cpu")), batch["targets"]
    if chunk:
        loss = getattr(model, CHUNKED_LOSS_METHOD)(inputs, targets, chunk)
    else:
        loss = token_loss_sum(model(**inputs).logits, targets)
    (loss / batch["num_loss_tokens"]).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return loss.detach(), grads


def _assert_same(reference, other) -> None:
    (loss0, grads0), (loss1, grads1) = reference, other
    torch.testing.assert_close(loss1, loss0, rtol=RTOL, atol=ATOL)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=RTOL, atol=ATOL, msg=name)


CHUNKS = [7, 64, 100, 10_000]  # 7 and 100 do not divide the 192 tokens; 10,000 is one chunk bigger than them


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_and_gradients_equal_the_full_logits(world1, tiny_model, untied_model, batch, tied):
    from sftflow.train.loss import attach_chunked_loss
    from sftflow.train.model import build_model

    model = build_model(str(tiny_model if tied else untied_model), world1, max_seq_len=SEQ_LEN)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    attach_chunked_loss(model)
    reference = _loss_and_grads(model, batch, 0)
    assert all(g.abs().sum() > 0 for g in reference[1].values())
    for chunk in CHUNKS:
        _assert_same(reference, _loss_and_grads(model, batch, chunk))


def test_chunked_loss_under_fsdp(world1, tiny_model, batch):
    """The FSDP-wrapped model (sharded root with tied lm_head / embeddings, as on GPUs) through the registered
    forward method: same loss and (reduced) gradients."""
    from torch.distributed.fsdp import FSDPModule

    from sftflow.train.loss import attach_chunked_loss
    from sftflow.train.model import build_model

    # An explicit (fp32) param dtype makes build_model wrap the one-rank model with FSDP, as it does with bf16.
    model = build_model(str(tiny_model), world1, param_dtype=torch.float32, max_seq_len=SEQ_LEN)
    assert isinstance(model, FSDPModule)
    attach_chunked_loss(model)
    reference = _loss_and_grads(model, batch, 0)
    for chunk in (7, 10_000):
        _assert_same(reference, _loss_and_grads(model, batch, chunk))


def test_chunked_loss_without_gradients_equals_the_full_logits(world1, tiny_model, batch):
    from sftflow.train.loss import CHUNKED_LOSS_METHOD, attach_chunked_loss, token_loss_sum
    from sftflow.train.model import build_model, model_inputs

    model = build_model(str(tiny_model), world1, max_seq_len=SEQ_LEN)
    attach_chunked_loss(model)
    inputs = model_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        full = token_loss_sum(model(**inputs).logits, batch["targets"])
        chunked = getattr(model, CHUNKED_LOSS_METHOD)(inputs, batch["targets"], 50)
    torch.testing.assert_close(chunked, full, rtol=RTOL, atol=ATOL)


def test_training_with_a_chunked_loss_matches_the_full_logits(tmp_path, world1, packed, tiny_model):
    common = dict(max_num_steps=4, save_period=4)
    full = tmp_path / "full"
    chunked = tmp_path / "chunked"
    run_inprocess(world1, full, packed, tiny_model, loss_chunk_tokens=0, **common)
    run_inprocess(world1, chunked, packed, tiny_model, loss_chunk_tokens=50, **common)
    losses_full, losses_chunked = logged(full), logged(chunked)
    assert sorted(losses_full) == sorted(losses_chunked) == [1, 2, 3, 4]
    for step in losses_full:
        assert losses_chunked[step] == pytest.approx(losses_full[step], rel=1e-5)
    assert_weights_close(final_weights(full), final_weights(chunked))


def test_automatic_chunking_only_for_big_logits():
    from sftflow.train.loss import LOGITS_BUDGET_BYTES, loss_chunk_size

    # Qwen's vocabulary and an 8k-token micro-batch: 4.6 GiB of fp32 logits -> chunks of 441 tokens (255.6 MiB).
    chunk = loss_chunk_size(None, 8192, 151_936)
    assert chunk == 441 and chunk * 151_936 * 4 <= LOGITS_BUDGET_BYTES < (chunk + 1) * 151_936 * 4
    # The tests' tiny model (vocab 300, micro-batches of 2 x 64 tokens) keeps the full logits.
    assert loss_chunk_size(None, 2 * SEQ_LEN, VOCAB) == 0
    # Exactly at the budget: not chunked; one token more: chunked.
    assert loss_chunk_size(None, LOGITS_BUDGET_BYTES // (4 * 1024), 1024) == 0
    assert loss_chunk_size(None, LOGITS_BUDGET_BYTES // (4 * 1024) + 1, 1024) == LOGITS_BUDGET_BYTES // (4 * 1024)
    # Explicit settings win: 0 never chunks, a positive number is the chunk size.
    assert loss_chunk_size(0, 8192, 151_936) == 0
    assert loss_chunk_size(128, 2 * SEQ_LEN, VOCAB) == 128


def test_loss_chunk_tokens_is_validated_and_not_a_result_key():
    from sftflow.config import validate_sections
    from sftflow.errors import SftflowError
    from sftflow.train.config import RESULT_KEYS
    from tests.train.conftest import training_config

    assert validate_sections(training_config())["training"]["loss_chunk_tokens"] is None
    assert validate_sections(training_config(loss_chunk_tokens=512))["training"]["loss_chunk_tokens"] == 512
    with pytest.raises(SftflowError, match="loss_chunk_tokens"):
        validate_sections(training_config(loss_chunk_tokens=-1))
    assert "loss_chunk_tokens" not in RESULT_KEYS  # same maths: a resume may change it
