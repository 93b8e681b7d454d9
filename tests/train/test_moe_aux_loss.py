"""The MoE router load-balancing loss on the fsdp backend (training.moe_aux_loss_coeff): megatron-core's `aux_loss`,
scaled as megatron-core scales it with per-token loss. tests/megatron_backend/test_training_cpu.py trains it on
both backends and compares the curves."""

from __future__ import annotations

import pytest
import torch

from sftflow.train.loss import DEFAULT_ROUTER_AUX_LOSS_COEF, moe_aux_loss_coeff, router_load_balancing_loss
from tests.train.conftest import make_moe_model


def test_the_coefficient_is_the_models_unless_the_key_sets_one():
    moe = {"num_experts": 4, "router_aux_loss_coef": 0.01}
    assert moe_aux_loss_coeff(None, moe) == 0.01
    assert moe_aux_loss_coeff(None, {"num_local_experts": 8}) == DEFAULT_ROUTER_AUX_LOSS_COEF == 1e-3  # Mixtral
    assert moe_aux_loss_coeff(0, moe) == 0.0
    assert moe_aux_loss_coeff(0.5, moe) == 0.5
    assert moe_aux_loss_coeff(0.5, {"hidden_size": 64}) == 0.0  # a dense model has no router


def _megatron_router_terms(layers: list[torch.Tensor], padding: torch.Tensor, top_k: int) -> torch.Tensor:
    """What megatron-core 0.16.1's router attaches per layer with a padding mask and calculate_per_token_loss, for a
    tensor/context-parallel group of one: aux_loss (coefficient 1) x the count of real tokens."""
    from megatron.core.transformer.moe import moe_utils

    total = torch.zeros(())
    for logits in layers:
        routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(
            logits, top_k, "softmax", padding_mask=padding.reshape(-1)
        )
        tokens_per_expert = routing_map.sum(dim=0)
        real = tokens_per_expert.sum() / top_k
        aux = moe_utils.switch_load_balancing_loss_func(
            probs=scores, tokens_per_expert=tokens_per_expert, total_num_tokens=real, topk=top_k,
            num_experts=logits.shape[-1], moe_aux_loss_coeff=1.0,
        )  # fmt: skip
        total = total + aux * real
    return total


def test_the_router_loss_is_megatron_cores_aux_loss_times_the_real_tokens_with_its_gradient():
    pytest.importorskip("megatron.core")
    torch.manual_seed(0)
    experts, top_k = 6, 2
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[2, 6:] = True  # a row's padding: no routing statistics, not counted
    layers = [torch.randn(30, experts, dtype=torch.float64).float().requires_grad_() for _ in range(2)]
    ours = router_load_balancing_loss(layers, ~padding, top_k)
    theirs = _megatron_router_terms(layers, padding, top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(ours, layers), torch.autograd.grad(theirs, layers), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        assert float(a[-4:].abs().max()) == 0.0  # padding tokens get no gradient
    # a padding token's logits change nothing; a real token's do
    moved = [t.detach().clone() for t in layers]
    moved[0][-4:, 0] += 5.0
    assert float(router_load_balancing_loss(moved, ~padding, top_k)) == pytest.approx(float(ours.detach()), rel=1e-6)
    moved[0][0, 0] += 5.0
    assert float(router_load_balancing_loss(moved, ~padding, top_k)) != pytest.approx(float(ours.detach()), rel=1e-3)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_moe_model(tmp_path_factory.mktemp("moe-aux") / "model")


def _engine(tmp_path, parallel, packed, model, **training):
    from sftflow.config import validate_sections
    from sftflow.packing import PackedDataset
    from sftflow.train.fsdp import FsdpEngine
    from sftflow.train.settings import TrainingConfig
    from sftflow.train.trainer import JobSpec
    from tests.train.conftest import training_config

    cfg = validate_sections(training_config(**training))
    spec = JobSpec(packed=str(packed), model=str(model), checkpoint_dir=str(tmp_path / "ckpt"))
    dataset = PackedDataset(packed)
    seq_len = int(dataset.index["max_total_sequence_length"])
    engine = FsdpEngine(TrainingConfig.from_section(cfg["training"]), spec, parallel, seq_len, 0)
    return engine, [dataset.get_bin(i) for i in range(3)]


def test_fsdp_adds_the_router_loss_to_the_objective_with_full_or_chunked_logits(tmp_path, world1, packed, moe_model):
    """The micro-batch's objective is its token-loss sum + coefficient x the router loss of its real tokens
    (HF's router logits, padding left out), whether lm_head's logits are computed whole or in chunks; the token
    loss (what is logged) is the same as without the term."""
    from sftflow.packing import collate_bins

    engine, bins = _engine(tmp_path, world1, packed, moe_model, moe_aux_loss_coeff=0.5)
    assert engine.moe_aux_loss_coeff == 0.5 and engine.moe_top_k == 2
    batch = collate_bins(bins, engine.seq_len, engine.pad_id)
    lengths = [len(b["input_ids"]) for b in bins]
    assert min(lengths) < engine.seq_len  # the rows have padding, which must not count
    with torch.no_grad():
        out = engine.model(**_inputs(engine, batch), output_router_logits=True)
        real = torch.arange(engine.seq_len)[None, :] < torch.tensor(lengths)[:, None]
        expected = router_load_balancing_loss(out.router_logits, real, 2)
        results = {}
        for chunk in (0, 16):
            engine.loss_chunk_tokens = chunk
            results[chunk] = engine.train_loss(bins, batch)
    assert len(out.router_logits) == 1  # the tiny model's second layer is its one MoE layer
    assert float(expected) > 0
    token_loss = float(engine.loss_sum(batch).detach())
    for chunk, (loss, objective) in results.items():
        assert float(loss) == pytest.approx(token_loss, rel=1e-6), chunk
        assert float(objective - loss) == pytest.approx(0.5 * float(expected), rel=1e-5), chunk

    off, _ = _engine(tmp_path / "off", world1, packed, moe_model, moe_aux_loss_coeff=0)
    with torch.no_grad():
        loss, objective = off.train_loss(bins, batch)
    assert off.moe_aux_loss_coeff == 0.0 and float(objective) == float(loss)


def _inputs(engine, batch):
    from sftflow.train.model import model_inputs

    return model_inputs(batch, engine.parallel.device, engine.attention)


def test_the_router_loss_gradient_survives_activation_checkpointing(tmp_path, world1, packed, moe_model):
    """Recomputing each decoder layer in the backward pass gives the same gradients of the objective (the router
    logits that HF records in the forward pass stay in the autograd graph)."""
    from sftflow.packing import collate_bins

    grads = {}
    for recompute in (False, True):
        engine, bins = _engine(
            tmp_path / str(recompute),
            world1,
            packed,
            moe_model,
            moe_aux_loss_coeff=2.0,
            activation_checkpointing=recompute,
        )
        batch = collate_bins(bins, engine.seq_len, engine.pad_id)
        _, objective = engine.train_loss(bins, batch)
        objective.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(".mlp.gate." in n for n in grads[True])  # the router is trained
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)
