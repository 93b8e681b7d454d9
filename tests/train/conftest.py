"""The trainer tests' builders and fixtures: a tiny Llama (and Qwen3-MoE) on disk, packed data in the
sftflow-packed-v2 format, training configs, runners (trainer subprocess or in-process), checkpoint readers, and a
one-process world for in-process runs. The megatron backend's tests, the GPU tests and
benchmarks/megatron_cpu_parity.py import them from here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

TRAIN_PY = REPO / "scripts" / "train.py"
CONVERT_PY = REPO / "scripts" / "convert_checkpoint.py"
VOCAB = 300
PAD_ID = 0
SEQ_LEN = 64


def tiny_llama_config(tie: bool = True, **overrides):
    from transformers import LlamaConfig

    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    sizes.update(overrides)
    return LlamaConfig(**sizes)


def make_tokenizer(out_dir: Path) -> None:
    """A word-level tokenizer over VOCAB ids with a chat template (only saved/copied by the export)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out_dir)


def make_model(out_dir: Path, seed: int = 0, tie: bool = True, **config) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie=tie, **config))
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tokenizer(out_dir)
    return out_dir


def make_moe_model(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE over VOCAB (4 experts, 2 active, the first layer dense), saved as transformers saves it
    (hub format: per-expert weights), with the tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        mlp_only_layers=[0], norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    make_tokenizer(out_dir)
    return out_dir


def random_sequences(num: int, seed: int, min_len: int = 6, max_len: int = 30) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss mask) pairs: a 'prompt' without loss followed by a 'response' with loss."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        n = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(3, VOCAB, size=n).astype(np.int64)
        mask = np.zeros(n, dtype=bool)
        mask[int(rng.integers(1, n - 1)) :] = True
        out.append((ids, mask))
    return out


def make_packed(out_dir: Path, num_sequences: int = 96, seed: int = 0, seq_len: int = SEQ_LEN) -> Path:
    """Random sequences written, one per bin in their order, with the packing stage's writer (the trainer packs
    each step's sequences into bins of seq_len tokens)."""
    from sftflow.packing import write_packed

    seqs = random_sequences(num_sequences, seed, max_len=min(30, seq_len))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_packed(
        out_dir,
        np.concatenate([ids for ids, _ in seqs]),
        np.concatenate([mask for _, mask in seqs]).astype(np.uint8),
        [len(ids) for ids, _ in seqs],
        sequences_per_shard=7,  # several shards, so steps read across shard files
        meta={"max_total_sequence_length": seq_len, "pad_token_id": PAD_ID, "tokenizer": "test", "source": "random"},
    )
    return out_dir


def training_config(**training) -> dict:
    base = {
        "train_global_batch_size": 8,
        "train_micro_batch_size": 2,
        "max_num_steps": 6,
        "max_num_epochs": 10,
        "learning_rate": 3e-3,
        "min_learning_rate": 3e-4,
        "warmup_steps": 2,
        "weight_decay": 0.01,
        "save_period": 2,
        "max_grad_norm": 1.0,
        "seed": 7,
        "precision": "fp32",
        "time_margin_seconds": 0,
    }
    base.update(training)
    return {"training": base, "packing": {"max_total_sequence_length": SEQ_LEN}}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def train_command(
    config: Path, packed: Path, model: Path, ckpt: Path, job: int = 0, jobs: int = 1, nproc: int = 1, extra=()
) -> list[str]:
    args = [
        "--config", str(config), "--packed", str(packed), "--model", str(model), "--checkpoint-dir", str(ckpt),
        "--job-index", str(job), "--num-jobs", str(jobs), "--done-file", str(ckpt / f"job{job}.done"), *extra,
    ]  # fmt: skip
    if nproc == 1:
        return [sys.executable, str(TRAIN_PY), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(TRAIN_PY),
        *args,
    ]


def subprocess_env() -> dict:
    """The environment of a trainer or rank subprocess. sftflow comes from the editable install; the repo root
    goes first on PYTHONPATH, for the `tests.` helpers the rank scripts import (tests/megatron_backend/cpu_shim.py),
    before what is there already (on a GPU machine, tests/gpu/run.sh's kit and scripts/)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SLURM_JOB_ID", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_train(*args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    cmd = train_command(*args, **kwargs)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Model tensors of the latest checkpoint, read without a process group."""
    from sftflow.train.checkpoint import latest_checkpoint
    from sftflow.train.fsdp import model_tensors, read_model_tensors

    latest = latest_checkpoint(ckpt_dir)
    tensors = model_tensors(latest.path)
    return read_model_tensors(latest.path, sorted(tensors), tensors)


def optimizer_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sftflow.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(ckpt_dir).path / "optimizer"  # the newest checkpoint keeps its optimizer state
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    want = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in md.items()
        if k.startswith("optim.state.") and isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(want, checkpoint_id=str(path), no_dist=True)
    assert want, f"{path}: no optimizer moments"
    return want


def inprocess_trainer(
    parallel, ckpt: Path, packed: Path, model: Path, job: int = 0, jobs: int = 1, validation_packed=None, **training
):
    """The Trainer of one chained job in this process (world of one); validation_packed: JobSpec's held-out share."""
    from sftflow.config import validate_sections
    from sftflow.train.trainer import JobSpec, Trainer

    cfg = validate_sections(training_config(**training))
    spec = JobSpec(
        packed=str(packed),
        model=str(model),
        checkpoint_dir=str(ckpt),
        job_index=job,
        num_jobs=jobs,
        done_file=str(ckpt / f"job{job}.done"),
        validation_packed=str(validation_packed) if validation_packed else None,
    )
    return Trainer(cfg, spec, parallel=parallel)


def run_inprocess(parallel, ckpt: Path, packed: Path, model: Path, job: int = 0, jobs: int = 1, **training) -> dict:
    """One chained job in this process (world of one), returning its done-file's record."""
    trainer = inprocess_trainer(parallel, ckpt, packed, model, job, jobs, **training)
    spec = trainer.spec
    record = trainer.train()
    written = json.loads(Path(spec.done_file).read_text())
    assert written == record.to_json()
    return written


def logged(ckpt: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (ckpt / "metrics" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def replay_digests(num_sequences: int, seed: int, gbs: int, steps: int) -> list[tuple[list[int], str]]:
    """Each step's sample ids and digest, recomputed from the documented rule rather than sftflow's code: epoch e
    is torch.randperm(n) under a generator seeded (seed * 1_000_003 + e) mod 2**63, a step takes the next gbs ids,
    an epoch's incomplete last batch is dropped; the digest is the first 16 hex digits of the sha256 of the ids,
    in that order, joined by commas. Returns [(ids, digest), ...]."""
    import hashlib

    out, epoch, pos = [], 0, 0
    while len(out) < steps:
        if pos + gbs > num_sequences:
            epoch, pos = epoch + 1, 0
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
        ids = torch.randperm(num_sequences, generator=g).tolist()[pos : pos + gbs]
        out.append((ids, hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]))
        pos += gbs
    return out


def metrics_rows(ckpt: Path) -> dict[int, dict]:
    """metrics.jsonl's training rows by step."""
    rows = [json.loads(line) for line in (ckpt / "metrics" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


WEIGHTS_ATOL = 2e-5  # fp32 accumulation-order noise after a few AdamW steps at lr 3e-3


def assert_weights_close(a: dict, b: dict, atol: float = WEIGHTS_ATOL) -> None:
    """Same parameter names, and every tensor equal to `atol` (no relative slack)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


class Box:
    """A plain Stateful holding a dict (the data order's and the schedule's state, in these tests)."""

    def __init__(self, **state) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def train_state_of(states: dict) -> dict:
    """What the Trainer resumes from, in one dict (step, data position, schedule)."""
    return {"step": states["train"].step, **states["sampler"].state, "scheduler": states["schedule"].state}


class ModelAndOptimizer:
    """The model / optimizer component of a checkpoint, as an engine provides it."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("data") / "packed")


@pytest.fixture(scope="session")
def world1():
    """A process group of one (gloo, in-memory store) shared by the in-process training tests."""
    from sftflow.train.parallel import init_parallel, shutdown

    pd = init_parallel(tp=1)
    yield pd
    shutdown()
