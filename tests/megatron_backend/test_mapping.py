"""HF <-> megatron-core weights and configs (issue 6, the CPU part): tiny Llama, Qwen2, Qwen3 and Qwen3-MoE
models built on the fly round-trip bit-exactly through megatron's layout and its TP / EP / expert-TP shards,
and megatron-core's own GPTModel (built on CPU, gloo ranks under torchrun) accepts every rank's shard with
strict=True."""

from __future__ import annotations

import json

import pytest
import torch

from sftflow.errors import SftflowError
from sftflow.megatron.hf_config import model_layout, padded_vocab_size, transformer_config_kwargs
from sftflow.megatron.weights import fuse_qkv, hf_to_megatron, megatron_to_hf, shard, unshard
from sftflow.train.parallel import ParallelDims as Parallel
from tests.megatron_backend.conftest import (
    FAMILIES,
    LLAMA3_ROPE,
    SMALL,
    hf_model,
    imported_logits_match,
    run_ranks,
    save_hf,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_megatron_hf_and_every_shard_layout_round_trip_bit_exactly(family):
    model = hf_model(family)
    hf = model.state_dict()
    layout = model_layout(model.config.to_dict())
    padded = padded_vocab_size(layout.vocab_size, 2)
    mc = hf_to_megatron(hf, layout, padded)
    assert mc["embedding.word_embeddings.weight"].shape == (padded, 48)  # padded with zero rows
    assert not mc["embedding.word_embeddings.weight"][layout.vocab_size :].any()
    assert ("output_layer.weight" in mc) == (not layout.tied_embeddings)
    back = megatron_to_hf(mc, layout)
    assert back.keys() == hf.keys()
    for name in hf:
        assert torch.equal(back[name], hf[name]), name
    model.load_state_dict(back, strict=True)

    layouts = [Parallel(tp=2), Parallel(pp=2), Parallel(tp=2, pp=2)]
    if layout.num_experts:
        layouts += [Parallel(ep=2), Parallel(tp=2, ep=2), Parallel(ep=2, etp=2), Parallel(tp=2, pp=2, ep=2, etp=2)]
    for sizes in layouts:
        coords = [
            sizes.at(tp_rank=t, pp_rank=s, ep_rank=e, etp_rank=j)
            for t in range(sizes.tp) for s in range(sizes.pp) for e in range(sizes.ep) for j in range(sizes.etp)
        ]  # fmt: skip
        shards = {at: shard(mc, layout, at) for at in coords}
        joined = unshard(shards, layout, sizes)
        assert joined.keys() == mc.keys(), sizes
        for name in mc:
            assert torch.equal(joined[name], mc[name]), (sizes, name)
        if sizes.pp > 1:  # stage 1 holds layers 2 and 3 as 0 and 1, the final norm and the output layer
            stage1 = shards[sizes.at(pp_rank=1)]
            assert torch.equal(stage1["decoder.layers.0.input_layernorm.weight"],
                               mc["decoder.layers.2.input_layernorm.weight"])  # fmt: skip
            assert "embedding.word_embeddings.weight" not in stage1 and "output_layer.weight" in stage1
            assert "decoder.final_layernorm.weight" not in shards[sizes]
        if sizes.ep > 1:  # each expert-parallel rank holds its own half of the experts, renumbered from 0
            first = shards[sizes.at(ep_rank=1)]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
            expert2 = mc["decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight"]
            assert torch.equal(first, torch.chunk(expert2, sizes.etp, 1)[0])


def test_qkv_is_fused_per_query_group_and_fc1_shards_keep_gate_and_up_apart():
    layout = model_layout({"model_type": "llama", **SMALL, "head_dim": 3})  # 2 groups of 2 query heads
    d, hidden = 3, 48
    q = torch.arange(4 * d)[:, None].expand(-1, hidden).float()  # row r of q = r
    k = 100 + torch.arange(2 * d)[:, None].expand(-1, hidden).float()
    v = 200 + torch.arange(2 * d)[:, None].expand(-1, hidden).float()
    rows = fuse_qkv(q, k, v, layout)[:, 0].tolist()
    # group 0: its 2 query heads, its key head, its value head; then group 1
    assert rows == [*range(0, 6), 100, 101, 102, 200, 201, 202, *range(6, 12), 103, 104, 105, 203, 204, 205]
    fc1 = torch.cat([torch.zeros(4, 1), torch.ones(4, 1)])  # [gate; up]
    mc = {"decoder.layers.0.mlp.linear_fc1.weight": fc1}
    rank1 = shard(mc, layout, Parallel(tp=2, tp_rank=1))["decoder.layers.0.mlp.linear_fc1.weight"]
    assert rank1[:, 0].tolist() == [0, 0, 1, 1]  # its gate rows, then its up rows


def test_config_translation_and_what_it_refuses():
    model = hf_model("qwen3_moe")
    layout = model_layout(model.config.to_dict())
    assert (layout.num_experts, layout.moe_top_k, layout.moe_ffn_hidden_size) == (4, 2, 16)
    assert layout.moe_layers == (True, False, True, True) and layout.qk_norm and not layout.qkv_bias
    kwargs = transformer_config_kwargs(layout)
    assert kwargs["moe_layer_freq"] == [1, 0, 1, 1] and kwargs["num_query_groups"] == 2 and kwargs["kv_channels"] == 16
    assert kwargs["moe_router_pre_softmax"] is False  # norm_topk_prob: top-k, then softmax over the chosen
    llama3 = model_layout(hf_model("llama3-tied").config.to_dict())
    assert (llama3.rope_theta, llama3.rope_scaling_factor, llama3.tied_embeddings) == (500000.0, 8.0, True)
    assert model_layout({"model_type": "qwen2", **SMALL}).qkv_bias
    with pytest.raises(SftflowError, match=r"cfg.json: model_type 'gpt2' is not supported by backend megatron"):
        model_layout({"model_type": "gpt2", **SMALL}, where="cfg.json")
    with pytest.raises(SftflowError, match=r"RoPE type 'yarn'"):
        model_layout({"model_type": "qwen3", **SMALL, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(SftflowError, match=r"high_freq_factor=2.0"):
        model_layout({"model_type": "llama", **SMALL, "rope_parameters": {**LLAMA3_ROPE, "high_freq_factor": 2.0}})
    with pytest.raises(SftflowError, match=r"use_sliding_window"):
        model_layout({"model_type": "qwen2", **SMALL, "use_sliding_window": True})
    with pytest.raises(SftflowError, match=r"num_key_value_heads \(2\) must be divisible by tensor parallel 4"):
        shard({}, model_layout({"model_type": "llama", **SMALL}), Parallel(tp=4))
    with pytest.raises(SftflowError, match=r"num_hidden_layers \(4\) must be divisible by pipeline parallel 3"):
        shard({}, model_layout({"model_type": "llama", **SMALL}), Parallel(pp=3))


@pytest.mark.parametrize(
    "family,tp,pp,ep,etp",
    [
        # Llama with TP / PP and Qwen3-MoE with PP x EP are trained in test_training_cpu.py (which loads every
        # rank's shard the same way); these are the families and layouts it does not train.
        ("qwen2", 2, 1, 1, 1),
        pytest.param("qwen3", 1, 2, 1, 1, marks=pytest.mark.slow),
        pytest.param("qwen3_moe", 2, 1, 2, 2, marks=pytest.mark.slow),
    ],  # fmt: skip
)
def test_megatron_core_accepts_every_ranks_shard(family, tp, pp, ep, etp, tmp_path):
    model_dir = save_hf(hf_model(family), tmp_path / "hf")
    records = run_ranks(model_dir, tmp_path / "out", tp, pp, ep, etp)
    assert all(r["loaded"] for r in records)
    coordinates = {tuple(r["ranks"][k] for k in ("tp", "pp", "ep", "etp")) for r in records}
    dense = {(t, s) for t, s, _, _ in coordinates}
    assert len(dense) == tp * pp  # every (tensor, pipeline) part is held by some rank
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    head_dim = FAMILIES[family][1].get("head_dim", 48 // 4)
    assert records[0]["shapes"][qkv][0] == (4 + 2 * 2) * head_dim // tp  # (heads + 2 x kv heads) x head_dim / TP
    assert all(len([k for k in r["shapes"] if k.endswith("input_layernorm.weight")]) == 4 // pp for r in records)


@pytest.mark.parametrize(
    "family,tp,pp,ep,etp,world",
    [
        ("llama", 2, 1, 1, 1, 4),  # data parallel 2: only one replica of each part writes it
        pytest.param("qwen3_moe", 1, 2, 2, 1, 4, marks=pytest.mark.slow),  # experts over 2 EP ranks, dense replicated
        pytest.param("qwen3_moe", 2, 1, 2, 2, 4, marks=pytest.mark.slow),
    ],
)
def test_megatron_checkpoint_shards_export_to_the_same_hf_model(family, tp, pp, ep, etp, world, tmp_path):
    """The megatron backend's checkpoint writer (each GPTModel rank's weights, written once per replica group)
    and the export (every shard read back, unsharded, mapped to HF names) give back the HF model bit-exactly,
    and the exported folder loads in transformers with the same logits."""
    from transformers import AutoModelForCausalLM

    from sftflow.train.export import export_checkpoint
    from tests.train.conftest import make_tokenizer

    model = hf_model(family)
    model_dir = save_hf(model, tmp_path / "hf")
    make_tokenizer(model_dir)
    records = run_ranks(model_dir, tmp_path / "ckpt", tp, pp, ep, etp, "--save-shards", f"world={world}")
    written = sorted(f for r in records for f in r["wrote"])
    assert len(written) == len(set(written))  # no part is written twice
    assert len([f for f in written if f.startswith("dense_")]) == tp * pp
    assert len([f for f in written if f.startswith("experts_")]) == (pp * ep * etp if family == "qwen3_moe" else 0)
    out = export_checkpoint(tmp_path / "ckpt" / "step_00000001", tmp_path / "exported", str(model_dir), dtype="float32")
    stored = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if family == "qwen3_moe":  # experts as hub checkpoints (and vLLM) have them, one tensor per expert
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in stored
        assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in stored)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize(
    "family", [f if f in ("llama", "qwen3_moe") else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)]
)
def test_imported_megatron_model_gives_the_hf_logits_on_cpu(family, tmp_path):
    """megatron-core's forward on the CPU through tests/megatron_backend/cpu_shim.py (the GPU runs the same
    check in tests/gpu/test_gpu_megatron_import.py)."""
    imported_logits_match(family, tmp_path, cpu=True)


def test_a_weight_the_mapping_does_not_know_is_an_error_not_dropped():
    model = hf_model("qwen3")
    layout = model_layout(model.config.to_dict())
    hf = {**model.state_dict(), "model.layers.0.self_attn.extra_scale": torch.ones(3)}
    with pytest.raises(SftflowError, match=r"HF weights not mapped to megatron .*extra_scale"):
        hf_to_megatron(hf, layout, padded_vocab_size(layout.vocab_size, 1))
    hf = dict(model.state_dict())
    del hf["model.layers.2.self_attn.k_norm.weight"]
    with pytest.raises(SftflowError, match=r"HF weights: model.layers.2.self_attn.k_norm.weight is missing"):
        hf_to_megatron(hf, layout, padded_vocab_size(layout.vocab_size, 1))


def test_transformer_engine_names_fuse_the_norms_except_before_moe_layers():
    from sftflow.megatron.weights import from_te_names, to_te_names

    model = hf_model("qwen3_moe")  # layer 1 is dense (mlp_only_layers), layers 0, 2, 3 are MoE
    layout = model_layout(model.config.to_dict())
    mc = hf_to_megatron(model.state_dict(), layout, padded_vocab_size(layout.vocab_size, 1))
    te = to_te_names(mc, {i: layout.is_moe_layer(i) for i in range(4)})
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te  # dense: fused into fc1
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in te  # MoE: the router reads the norm's output
    assert all(f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight" in te for i in range(4))
    assert not any(k.endswith("input_layernorm.weight") for k in te)
    back = from_te_names(te)
    assert back.keys() == mc.keys() and all(back[k] is mc[k] for k in mc)
