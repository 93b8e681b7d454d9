"""The megatron backend trains, resumes and exports, run for real on CPU gloo ranks.

megatron-core's training path is CUDA-only; cpu_shim.py redirects its device placement, streams and CUDA
RNG calls to the CPU (tests only), so these tests run sftflow's MegatronEngine with megatron-core's own
GPTModel, DistributedDataParallel, distributed optimizer, 1F1B pipeline schedule, vocab-parallel
cross-entropy and MoE all-to-all dispatcher, in fp32 with the local (non-Transformer-Engine) layers:

* every parallel layout gives the fsdp backend's loss, gradient norm and validation loss at every step
  (same packed batches, same loss normalisation, same AdamW with weight decay off for 1-D weights);
* two chained jobs end bitwise equal to one (model shards, distributed-optimizer state, data position);
* the final checkpoint exports to a HF folder that transformers loads, close to the fsdp export.

What only a GPU shows (bf16, Transformer Engine THD attention, context / sequence parallelism, NCCL,
speed) is in tests/gpu.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftflow.train.checkpoint import complete_checkpoints
from sftflow.train.export import export_checkpoint
from tests.megatron_backend.conftest import STEPS, assert_same_curve, fsdp_job, megatron_job, val_rows
from tests.train.conftest import (
    WEIGHTS_ATOL,
    assert_weights_close,
    logged,
    make_moe_model,
    run_train,
    training_config,
    write_config,
)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_moe_model(tmp_path_factory.mktemp("moe") / "model")


# The layout tests train without the MoE load-balancing loss: its statistics are per micro-batch, so with it a run
# on 2 data-parallel ranks (EP2, PP2xEP2) trains another objective than the one-process fsdp reference
# (test_moe_load_balancing_loss_trains_the_same_curve_on_both_backends compares equal layouts).
NO_AUX = {"moe_aux_loss_coeff": 0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, packed, moe_model):
    """fsdp runs of the dense and the MoE model: the curves every megatron layout must reproduce."""
    tmp = tmp_path_factory.mktemp("fsdp")
    val = val_rows(tmp / "val.jsonl")
    runs = {}
    for name, model in (("dense", tiny_model), ("moe", moe_model)):
        fsdp_job(tmp, model, packed, tmp / name, max_num_steps=STEPS, val_period=2, validation_data=str(val), **NO_AUX)
        runs[name] = tmp / name
    return {"val": val, **runs}


@pytest.fixture(scope="module")
def one_job_runs(tmp_path_factory, tiny_model, moe_model, packed, reference):
    """Single-job megatron runs (with validation), by (model, layout id); the resume test reuses them."""
    cache: dict[tuple[str, str], Path] = {}

    def run(which: str, layout_id: str, nproc: int, layout: dict) -> Path:
        if (which, layout_id) not in cache:
            tmp = tmp_path_factory.mktemp(f"{which}-{layout_id}")
            model = tiny_model if which == "dense" else moe_model
            record = megatron_job(tmp, model, packed, tmp / "ckpt", nproc, max_num_steps=STEPS, val_period=2,
                                  validation_data=str(reference["val"]), **NO_AUX, **layout)  # fmt: skip
            assert record["complete"] and record["end_step"] == STEPS
            cache[which, layout_id] = tmp / "ckpt"
        return cache[which, layout_id]

    return run


@pytest.mark.parametrize(
    "nproc, layout",
    [
        # The fast tier (make test-fast) trains one layout of each kind; the others are slow.
        pytest.param(1, {}, id="single"),
        pytest.param(2, {}, id="dp2", marks=pytest.mark.slow),  # data parallel 2: the optimizer shards its state
        pytest.param(2, {"tensor_model_parallel_size": 2}, id="tp2"),
        pytest.param(2, {"pipeline_model_parallel_size": 2}, id="pp2"),  # tied embeddings
        pytest.param(
            4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, id="tp2pp2", marks=pytest.mark.slow
        ),
        pytest.param(1, {"activation_checkpointing": True}, id="recompute", marks=pytest.mark.slow),
    ],
)
def test_every_layout_trains_the_fsdp_curve(request, one_job_runs, reference, nproc, layout):
    ckpt = one_job_runs("dense", request.node.callspec.id, nproc, layout)
    assert_same_curve(ckpt, reference["dense"])
    meta = json.loads((ckpt / "step_00000004" / "meta.json").read_text())
    assert meta["backend"] == "megatron" and meta["world_size"] == nproc
    fsdp_meta = json.loads((reference["dense"] / "step_00000004" / "meta.json").read_text())
    assert meta["num_params"] == fsdp_meta["num_params"]  # the HF model's count (MFU), whatever the layout


@pytest.mark.parametrize(
    "nproc, layout",
    [
        pytest.param(1, {}, id="single"),
        pytest.param(2, {"expert_model_parallel_size": 2}, id="ep2", marks=pytest.mark.slow),
        pytest.param(
            4, {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}, id="pp2ep2", marks=pytest.mark.slow
        ),
    ],  # fmt: skip
)
def test_moe_layouts_train_the_fsdp_curve(request, one_job_runs, reference, nproc, layout):
    ckpt = one_job_runs("moe", request.node.callspec.id, nproc, layout)
    assert_same_curve(ckpt, reference["moe"])
    meta, fsdp_meta = (json.loads((c / "step_00000004" / "meta.json").read_text()) for c in (ckpt, reference["moe"]))
    assert meta["num_params"] == fsdp_meta["num_params"]


@pytest.mark.parametrize(
    "which, layout_id, nproc, layout",
    [
        ("dense", "dp2", 2, {}),
        ("moe", "pp2ep2", 4, {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}),
    ],  # fmt: skip
    ids=["dense-dp2", "moe-pp2ep2"],  # stage 0 of the MoE model has no experts: no expert optimizer state
)
@pytest.mark.slow
def test_two_chained_jobs_end_bitwise_equal_to_one(
    tmp_path, one_job_runs, tiny_model, moe_model, packed, reference, which, layout_id, nproc, layout
):
    one_dir = one_job_runs(which, layout_id, nproc, layout)
    model = tiny_model if which == "dense" else moe_model
    same = {"max_num_steps": STEPS, "val_period": 2, "validation_data": str(reference["val"]), **NO_AUX, **layout}
    same["keep_top_k"] = 1  # retention by val_loss; the one job keeps both steps (default keep_top_k 50)
    first = megatron_job(tmp_path, model, packed, tmp_path / "two", nproc, 0, 2, **same)
    second = megatron_job(tmp_path, model, packed, tmp_path / "two", nproc, 1, 2, **same)
    assert (first["end_step"], second["start_step"], second["end_step"]) == (2, 2, STEPS)
    one = sorted((one_dir / "step_00000004" / "model").iterdir())
    two = tmp_path / "two" / "step_00000004" / "model"
    assert one and [f.name for f in one] == sorted(f.name for f in two.iterdir())
    for f in one:
        assert f.read_bytes() == (two / f.name).read_bytes(), f.name
    for r in range(nproc):  # Adam moments, fp32 main weights and step of every rank's optimizer shard
        a = torch.load(one_dir / "step_00000004" / "optimizer" / f"rank{r:05d}.pt", weights_only=True)
        b = torch.load(two.parent / "optimizer" / f"rank{r:05d}.pt", weights_only=True)
        for x, y in zip(flat_tensors(a["parameter_states"]), flat_tensors(b["parameter_states"]), strict=True):
            assert torch.equal(x, y)
    for key in ("loss", "grad_norm", "val_loss"):
        assert logged(tmp_path / "two", key) == logged(one_dir, key), key
    val = logged(tmp_path / "two", "val_loss")
    assert [c.step for c in complete_checkpoints(tmp_path / "two")] == ([2, 4] if val[2] < val[4] else [4])
    # keep_optimizer_state latest: step 2 kept its model and train state, not its optimizer shards; it still exports
    older = one_dir / "step_00000002"
    assert not (older / "optimizer").exists() and sorted(p.name for p in (older / "state").iterdir())
    exported = export_checkpoint(older, tmp_path / "hf_step2", str(model))
    assert json.loads((exported / "sftflow_export.json").read_text())["step"] == 2


def assert_close_but_adam_noise(a: dict, b: dict) -> None:
    """assert_weights_close, but for a few single elements: an element whose gradient is ~1e-9 (say, one embedding
    coordinate of a token seen once, in a prompt) gets an Adam update of m / (sqrt(v) + eps) with eps 1e-8, so
    the rounding of its gradient moves its update by up to ~0.1 x lr. The MoE run with 2 ranks sums its
    gradients in another order than the fsdp run (seen: one coordinate of a token's embedding off by 2.5e-4, every
    other element within 2e-5). A mapping error moves whole tensors: at most 1 element in 10,000 of a tensor may be off, by < 1e-3."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        off = int((diff > WEIGHTS_ATOL).sum())
        assert off <= max(1, diff.numel() // 10_000) and float(diff.max()) < 1e-3, (name, off, float(diff.max()))


def flat_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flat_tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    return []


@pytest.mark.parametrize(
    "which, layout_id, nproc, layout",
    [
        ("dense", "tp2", 2, {"tensor_model_parallel_size": 2}),  # vocabulary split over 2 ranks
        pytest.param("moe", "ep2", 2, {"expert_model_parallel_size": 2}, marks=pytest.mark.slow),
    ],  # fmt: skip
    ids=["dense-tp2", "moe-ep2"],
)
def test_the_final_checkpoint_exports_to_a_hf_model_close_to_the_fsdp_export(
    tmp_path, one_job_runs, tiny_model, moe_model, reference, which, layout_id, nproc, layout
):
    from transformers import AutoModelForCausalLM

    base = str(tiny_model if which == "dense" else moe_model)
    ckpt = one_job_runs(which, layout_id, nproc, layout)
    ours = export_checkpoint(ckpt / "step_00000004", tmp_path / "megatron_hf", base)
    theirs = export_checkpoint(reference[which] / "step_00000004", tmp_path / "fsdp_hf", base)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    names = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (ours, theirs)]
    assert names[0].keys() == names[1].keys()
    if which == "moe":  # both backends write experts as hub checkpoints (and vLLM) have them
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in names[0]
    a = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32)
    if which == "dense":
        assert_weights_close(dict(a.state_dict()), dict(b.state_dict()))
    else:
        assert_close_but_adam_noise(dict(a.state_dict()), dict(b.state_dict()))
    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens).logits, b(tokens).logits, rtol=0, atol=1e-4)
    assert json.loads((ours / "sftflow_export.json").read_text())["step"] == STEPS


@pytest.mark.slow
def test_without_clipping_megatron_logs_the_grad_norm_and_trains_the_fsdp_curve(tmp_path, tiny_model, packed):
    """max_grad_norm null (NeMo-Skills' default): megatron-core computes the norm only when it clips, so the engine
    clips at infinity, which scales nothing; the logged norm and the weights follow the unclipped fsdp run."""
    run = dict(max_num_steps=STEPS, max_grad_norm=None, learning_rate=0.05, min_learning_rate=0.05, warmup_steps=0)
    fsdp_job(tmp_path, tiny_model, packed, tmp_path / "fsdp", **run)
    megatron_job(tmp_path, tiny_model, packed, tmp_path / "megatron", 1, **run)
    norms = logged(tmp_path / "megatron", "grad_norm")
    assert norms and all(n == n and n > 1.0 for n in norms.values())  # not NaN; above 1, so clipping at 1 would show
    for key in ("loss", "grad_norm"):
        ours, theirs = logged(tmp_path / "megatron", key), logged(tmp_path / "fsdp", key)
        assert ours.keys() == theirs.keys()
        for step in ours:
            assert ours[step] == pytest.approx(theirs[step], rel=1e-4), (key, step)


# A load-balancing coefficient far above the models' 1e-3, so that the router term moves the gradient norm (by 2x)
# and the later losses (by 2e-3) far beyond the tolerances of the comparison.
AUX = 2.0


@pytest.fixture(scope="module")
def aux_reference(tmp_path_factory, moe_model, packed):
    """fsdp runs of the MoE model with the load-balancing loss at AUX on 1 and 2 processes (the statistics are per
    micro-batch: 2 data-parallel ranks form other micro-batches), and one without the term."""
    tmp = tmp_path_factory.mktemp("fsdp-aux")
    for name, coeff, nproc in (("aux-dp1", AUX, 1), ("aux-dp2", AUX, 2), ("off", 0, 1)):
        config = write_config(tmp / f"{name}.json", training_config(max_num_steps=STEPS, moe_aux_loss_coeff=coeff))
        run_train(config, packed, moe_model, tmp / name, nproc=nproc)
    return tmp


def relative_gap(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


@pytest.mark.parametrize(
    "nproc, layout",
    [
        # (a single process is left out: pp2 runs the same one-data-parallel-rank reference, the other tests the
        # single-process path) pipeline stages pad micro-batches to the longest: the padding must stay out of the router statistics
        pytest.param(2, {"pipeline_model_parallel_size": 2}, id="pp2"),
        # 2 data-parallel ranks, each with its own micro-batches and half of the experts
        pytest.param(2, {"expert_model_parallel_size": 2}, id="ep2"),
    ],
)
@pytest.mark.slow
def test_moe_load_balancing_loss_trains_the_same_curve_on_both_backends(
    tmp_path, moe_model, packed, aux_reference, nproc, layout
):
    """With the router load-balancing loss at AUX, megatron gives the loss and gradient norm of the fsdp run with as
    many data-parallel ranks at every step. The control: both differ from the run without the term (gradient norm
    from step 1, loss from step 2) by far more than the tolerance, so dropping the term from either backend fails."""
    megatron_job(tmp_path, moe_model, packed, tmp_path / "megatron", nproc, max_num_steps=STEPS,
                 moe_aux_loss_coeff=AUX, **layout)  # fmt: skip
    dp = nproc // layout.get("pipeline_model_parallel_size", 1)
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
        ours, theirs, off = (
            logged(d, key) for d in (tmp_path / "megatron", aux_reference / f"aux-dp{dp}", aux_reference / "off")
        )
        assert ours.keys() == theirs.keys() == off.keys() and len(ours) == STEPS, key
        for step in ours:
            assert ours[step] == pytest.approx(theirs[step], rel=rel), (key, step, ours[step], theirs[step])
        moved = {s: v for s, v in theirs.items() if key == "grad_norm" or s > 1}  # step 1's loss precedes any update
        assert relative_gap(moved, off) > 20 * rel, (key, theirs, off)
        assert relative_gap({s: ours[s] for s in moved}, off) > 20 * rel, (key, ours, off)
