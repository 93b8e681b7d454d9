"""Helpers and fixtures of the megatron backend's tests: the trainer tests' tiny model and packed data; megatron and
fsdp training runs on CPU gloo ranks and their curves compared (test_training_cpu.py, test_chunked_loss.py); tiny HF
models of each family, megatron_ranks.py under torchrun and the HF -> megatron-core logits check (test_mapping.py,
and on a GPU tests/gpu/test_gpu_megatron_import.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.train.conftest import (
    logged,
    packed,  # noqa: F401  (a fixture)
    run_train,
    subprocess_env,
    tiny_model,  # noqa: F401  (a fixture)
    training_config,
    write_config,
)

HERE = Path(__file__).resolve().parent
STEPS = 4


def val_rows(path: Path) -> Path:
    import random

    rng = random.Random(0)
    rows = [
        {
            "input": " ".join(f"w{rng.randrange(3, 300)}" for _ in range(rng.randrange(3, 10))),
            "output": " ".join(f"w{rng.randrange(3, 300)}" for _ in range(rng.randrange(3, 10))),
        }
        for _ in range(9)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def megatron_job(tmp: Path, model: Path, packed_dir: Path, ckpt: Path, nproc: int, job=0, jobs=1, **training) -> dict:
    """One chained megatron job on `nproc` CPU ranks (torchrun); returns its done record."""
    config = write_config(tmp / f"megatron-{ckpt.name}.json", training_config(backend="megatron", **training))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "cpu_train.py"), str(config), str(packed_dir), str(model), str(ckpt), str(job), str(jobs)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def fsdp_job(tmp: Path, model: Path, packed_dir: Path, ckpt: Path, **training) -> None:
    run_train(write_config(tmp / f"fsdp-{ckpt.name}.json", training_config(**training)), packed_dir, model, ckpt)


def assert_same_curve(megatron_ckpt: Path, fsdp_ckpt: Path) -> None:
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4), ("val_loss", 1e-5)):
        ours, theirs = logged(megatron_ckpt, key), logged(fsdp_ckpt, key)
        assert ours.keys() == theirs.keys() and ours, key
        for step in ours:
            assert ours[step] == pytest.approx(theirs[step], rel=rel), (key, step, ours[step], theirs[step])


# --- HF <-> megatron-core mapping (test_mapping.py, tests/gpu/test_gpu_megatron_import.py) ---

SMALL = {"vocab_size": 100, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", {"head_dim": 16}),
    "llama3-tied": ("LlamaConfig", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 16, "mlp_only_layers": [1], "norm_topk_prob": True}),
}  # fmt: skip


def hf_model(family: str):
    import transformers

    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1; make every tensor distinct so a misplaced one cannot go unseen
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def save_hf(model, path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same storage as the embedding
    save_file(state, path / "model.safetensors")
    return path


def run_ranks(model_dir: Path, out: Path, tp: int, pp: int, ep: int, etp: int, *flags: str) -> list[dict]:
    """megatron_ranks.py on CPU gloo ranks (world: pp x max(tp, ep x etp), or `world=N` in flags)."""
    world = pp * max(tp, ep * etp)
    for flag in flags:
        if flag.startswith("world="):
            world = int(flag[6:])
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(HERE / "megatron_ranks.py"), str(model_dir), str(out), str(tp), str(pp), str(ep), str(etp),
           *[f for f in flags if not f.startswith("world=")]]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def imported_logits_match(family: str, tmp_path: Path, cpu: bool) -> None:
    """megatron-core's GPTModel holding the mapped weights of a tiny HF model gives the HF model's logits
    (fp32 on both sides: only the order of floating-point operations differs)."""
    model = hf_model(family).eval()
    model_dir = save_hf(model, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, out / "tokens.pt")
    run_ranks(model_dir, out, 1, 1, 1, 1, "--forward", *(["--cpu"] if cpu else []))
    megatron_logits = torch.load(out / "logits.pt", weights_only=True)
    device = "cpu" if cpu else "cuda"
    with torch.no_grad():
        hf_logits = model.to(device)(input_ids=tokens.to(device)).logits.float().cpu()
    assert megatron_logits.shape == hf_logits.shape
    torch.testing.assert_close(megatron_logits, hf_logits, rtol=1e-4, atol=1e-4)
