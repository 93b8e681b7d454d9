"""DCP checkpoint -> HF folder: streamed, sharded, atomic, and the exported model computes the trainer's logits."""

from __future__ import annotations

import json

import pytest
import torch

from sftflow.errors import SftflowError
from sftflow.packing import PackedDataset, collate_bins
from sftflow.train.checkpoint import ENGINE, Checkpointer, latest_checkpoint
from sftflow.train.export import export_checkpoint, plan_shards, resolve_checkpoint
from sftflow.train.model import build_model, model_inputs
from tests.train.conftest import ModelAndOptimizer, make_model, run_inprocess


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world1, packed, tiny_model):
    ckpt = tmp_path_factory.mktemp("export") / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=3, save_period=2)
    return ckpt


def _trainer_logits(world1, model_dir, ckpt, batch):
    """Logits of the trainer's own (FSDP, varlen-attention) model after loading the checkpoint."""
    model = build_model(str(model_dir), world1)
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(ckpt, world1).load(latest_checkpoint(ckpt).path, {ENGINE: ModelAndOptimizer(model, optimizer)})
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(batch, world1.device)).logits


def _hf_logits(hf_dir, batch):
    """Logits of the exported model through plain transformers, one sequence per forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    out = torch.zeros(*batch["input_ids"].shape, model.config.vocab_size)
    bounds = batch["cu_seqlens"].tolist()
    flat_ids = batch["input_ids"].reshape(-1)
    flat_out = out.view(-1, model.config.vocab_size)
    with torch.no_grad():
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            flat_out[s:e] = model(input_ids=flat_ids[s:e][None]).logits[0]
    return out


def test_exported_model_gives_the_trainers_logits(tmp_path, world1, packed, tiny_model, trained):
    hf = tmp_path / "hf"
    export_checkpoint(latest_checkpoint(trained).path, hf, str(tiny_model))
    data = PackedDataset(packed)
    batch = collate_bins([data.get_bin(0), data.get_bin(1)], 64, 0)
    expected = _trainer_logits(world1, tiny_model, trained, batch)
    torch.testing.assert_close(_hf_logits(hf, batch), expected, rtol=1e-5, atol=1e-5)
    # and the export is not simply the base model
    assert not torch.allclose(_hf_logits(tiny_model, batch), expected, atol=1e-3)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as the embedding
    assert json.loads((hf / "sftflow_export.json").read_text())["step"] == 3
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (hf / name).is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(hf).chat_template


def test_untied_model_exports_its_lm_head_in_several_shards(tmp_path, world1, packed):
    base = make_model(tmp_path / "untied", tie=False)
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, base, max_num_steps=1)
    hf = tmp_path / "hf"
    export_checkpoint(latest_checkpoint(ckpt).path, hf, str(base), dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "lm_head.weight" in index["weight_map"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_plan_shards_keeps_order_and_size_limit():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1, "e": 1}
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]


def test_failed_export_leaves_nothing_behind(tmp_path, trained, tiny_model, monkeypatch):
    import sftflow.train.export as export

    real_save, calls = export.save_file, []

    def save_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export, "save_file", save_then_fail)
    out = tmp_path / "hf"
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(latest_checkpoint(trained).path, out, str(tiny_model), max_shard_bytes=40_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_a_step_that_was_never_saved_is_an_error_naming_it_and_save_period(trained):
    assert resolve_checkpoint(trained, 2).name == "step_00000002"
    with pytest.raises(SftflowError, match=r"step 1 was never saved.*training.save_period.*saved steps: 2, 3"):
        resolve_checkpoint(trained, 1)


def test_convert_cli_refuses_incomplete_training(tmp_path, trained, tiny_model):
    from sftflow.train.export_cli import convert_main

    done = tmp_path / "job1.done"
    done.write_text(json.dumps({"job_index": 1, "num_jobs": 2, "end_step": 3, "total_steps": 10, "complete": False}))
    out = tmp_path / "hf"
    argv = [
        "--checkpoint-dir",
        str(trained),
        "--output",
        str(out),
        "--model",
        str(tiny_model),
        "--done-file",
        str(done),
    ]
    assert convert_main(argv) == 2
    assert not out.exists()
    done.write_text(
        json.dumps({"end_step": 3, "total_steps": 3, "complete": True, "checkpoint": str(trained / "step_00000003")})
    )
    assert convert_main(argv) == 0
    assert (out / "model.safetensors.index.json").is_file()
