"""Checkpoint averaging: the element-wise mean, laid out like the input, loadable, atomic, and memory-bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import sftflow.averaging as averaging
from sftflow.averaging import (
    average_from_snakemake,
    average_hf_models,
    average_main,
    check_average_steps,
)
from sftflow.errors import SftflowError
from tests.train.conftest import make_tokenizer, tiny_llama_config


def _write_weights(model_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps({"source": model_dir.name}), encoding="utf-8")
    return model_dir


def _random_weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(5, 7, generator=g).to(dtype),
        "b.bias": torch.randn(13, generator=g).to(dtype),
        "scalar": torch.randn((), generator=g).to(dtype),
    }


def _llama(model_dir: Path, seed: int, dtype=torch.bfloat16, shard="40KB", tokenizer=True) -> dict[str, torch.Tensor]:
    """Save a tiny untied Llama (sharded when `shard`) and return its state dict."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie=False)).to(dtype)
    model.save_pretrained(model_dir, max_shard_size=shard)
    if tokenizer:
        make_tokenizer(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _mean(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: (sum(sd[k].to(torch.float64) for sd in state_dicts) / len(state_dicts)).to(v.dtype)
        for k, v in state_dicts[0].items()
    }


def _shard_grouping(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_checkpoints_average_to_their_elementwise_mean(tmp_path, dtype):
    weights = [_random_weights(seed, dtype) for seed in (1, 2)]
    dirs = [_write_weights(tmp_path / f"step_{s}", w) for s, w in zip((10, 20), weights)]
    record = average_hf_models(dirs, tmp_path / "avg", steps=[10, 20])

    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    assert not (tmp_path / "avg" / "model.safetensors.index.json").exists()  # single file in, single file out
    for name, expected in _mean(weights).items():
        assert averaged[name].dtype == dtype and averaged[name].shape == expected.shape
        # float64 mean rounded once to dtype vs float32 sum rounded twice: at most one unit in the last place
        torch.testing.assert_close(averaged[name], expected, msg=name)
    assert record["steps"] == [10, 20] and record["num_tensors"] == 3
    assert record["dtypes"] == {str(dtype).removeprefix("torch."): 3}
    saved = json.loads((tmp_path / "avg" / "sftflow_average.json").read_text())
    assert saved == record and saved["models"] == [str(d) for d in dirs]


def test_bf16_mean_is_the_float32_mean_rounded_once(tmp_path):
    weights = [_random_weights(seed, torch.bfloat16) for seed in (1, 2, 3)]
    dirs = [_write_weights(tmp_path / f"m{i}", w) for i, w in enumerate(weights)]
    average_hf_models(dirs, tmp_path / "avg")
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    for name in weights[0]:
        expected = (sum(w[name].float() for w in weights) / 3).to(torch.bfloat16)
        assert torch.equal(averaged[name], expected), name


def test_three_sharded_models_average_into_the_same_shards_and_load_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    states = [_llama(tmp_path / f"step_{s}", seed=s, tokenizer=s == 3) for s in (1, 2, 3)]
    (tmp_path / "step_3" / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    out = tmp_path / "hf_models" / "average"
    # a tiny chunk, so tensors are also averaged across chunk boundaries
    record = average_hf_models([tmp_path / f"step_{s}" for s in (1, 2, 3)], out, chunk_elements=1000)

    assert record["steps"] == [1, 2, 3]  # from the step_N directory names
    first = tmp_path / "step_1"
    assert _shard_grouping(out) == _shard_grouping(first) and len(set(_shard_grouping(out).values())) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    loaded = {k: v for shard in shards for k, v in load_file(shard).items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in loaded.values())
    assert (
        index["metadata"]["total_size"]
        == json.loads((first / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    )

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = _mean(states)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        exact = (sum(sd[name].float() for sd in states) / 3).to(torch.bfloat16)
        assert torch.equal(got[name], exact), name
        torch.testing.assert_close(got[name], expected[name], msg=name)
    # non-weight files come from the last (most trained) model
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert record["config_from"] == str(tmp_path / "step_3")
    assert not (out / "sftflow_export.json").exists()


def test_models_with_different_shard_layouts_take_the_first_models_layout(tmp_path):
    single = _llama(tmp_path / "single", seed=1, dtype=torch.float32, shard="1GB", tokenizer=False)
    sharded = _llama(tmp_path / "sharded", seed=2, dtype=torch.float32, tokenizer=False)
    assert (tmp_path / "single" / "model.safetensors").is_file()
    average_hf_models([tmp_path / "single", tmp_path / "sharded"], tmp_path / "avg")
    assert [p.name for p in (tmp_path / "avg").glob("*.safetensors")] == ["model.safetensors"]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    for name, expected in _mean([single, sharded]).items():
        torch.testing.assert_close(averaged[name], expected, msg=name)


def test_a_single_model_averages_to_itself(tmp_path):
    weights = _random_weights(1, torch.bfloat16)
    average_hf_models([_write_weights(tmp_path / "m", weights)], tmp_path / "avg")
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    assert all(torch.equal(averaged[k], v) for k, v in weights.items())


def _pair(tmp_path, first: dict, second: dict) -> list[Path]:
    return [_write_weights(tmp_path / "one", first), _write_weights(tmp_path / "two", second)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("b.bias"), r"two: missing tensor 'b.bias' \(present in .*one\)"),
        (lambda w: w.update(extra=torch.zeros(2)), r"two: extra tensor 'extra'"),
        (
            lambda w: w.update({"a.weight": torch.zeros(7, 5)}),
            r"two: tensor 'a.weight' has shape \[7, 5\] but \[5, 7\]",
        ),
        (lambda w: w.update({"b.bias": torch.zeros(13, dtype=torch.float16)}), r"two: tensor 'b.bias' has dtype F16"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_models_that_differ_are_rejected_naming_the_tensor_and_model(tmp_path, change, message):
    second = _random_weights(2)
    change(second)
    with pytest.raises(SftflowError, match=message):
        average_hf_models(_pair(tmp_path, _random_weights(1), second), tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_bool_tensors_cannot_be_averaged(tmp_path, dtype):
    weights = {**_random_weights(1), "position_ids": torch.zeros(4, dtype=dtype)}
    with pytest.raises(SftflowError, match=r"one: tensor 'position_ids' has an integer/bool dtype"):
        average_hf_models(_pair(tmp_path, weights, dict(weights)), tmp_path / "avg")


def test_missing_models_and_weights_are_rejected(tmp_path):
    with pytest.raises(SftflowError, match="no models to average"):
        average_hf_models([], tmp_path / "avg")
    with pytest.raises(SftflowError, match=r"nowhere: model directory not found"):
        average_hf_models([tmp_path / "nowhere"], tmp_path / "avg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SftflowError, match=r"empty: no model.safetensors or model.safetensors.index.json"):
        average_hf_models([tmp_path / "empty"], tmp_path / "avg")
    one = _write_weights(tmp_path / "one", _random_weights(1))
    with pytest.raises(SftflowError, match="given twice"):
        average_hf_models([one, tmp_path / "." / "one"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_a_truncated_weight_file_is_rejected(tmp_path):
    one = _write_weights(tmp_path / "one", _random_weights(1))
    two = _write_weights(tmp_path / "two", _random_weights(2))
    data = (two / "model.safetensors").read_bytes()
    (two / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(SftflowError, match=r"two/model.safetensors: tensor .* truncated or corrupt"):
        average_hf_models([one, two], tmp_path / "avg")


def test_steps_must_match_the_step_directories_exactly(tmp_path):
    dirs = [_write_weights(tmp_path / "step_100", _random_weights(1)), _write_weights(tmp_path / "step_1000", {})]
    with pytest.raises(SftflowError, match=r"step_100: given as step 1000, but its directory name says step 100$"):
        average_hf_models(dirs, tmp_path / "avg", steps=[1000, 100])
    (dirs[0] / "sftflow_export.json").write_text(json.dumps({"step": 200}))
    with pytest.raises(SftflowError, match=r"step_100: given as step 100, but sftflow_export.json says step 200"):
        average_hf_models(dirs[:1], tmp_path / "avg", steps=[100])
    with pytest.raises(SftflowError, match=r"2 steps \[100, 1000\] for 1 model directories"):
        average_hf_models(dirs[:1], tmp_path / "avg", steps=[100, 1000])


def test_a_failure_while_writing_leaves_no_output_and_keeps_an_older_one(tmp_path, monkeypatch):
    dirs = _pair(tmp_path, _random_weights(1), _random_weights(2))
    out = tmp_path / "avg"
    calls = []

    def failing_read(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk error")
        return real_read(*args)

    real_read = averaging._read_rows
    monkeypatch.setattr(averaging, "_read_rows", failing_read)
    with pytest.raises(OSError, match="disk error"):
        average_hf_models(dirs, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no output, no temporary

    out.mkdir()
    (out / "previous").write_text("kept")
    calls.clear()
    with pytest.raises(OSError, match="disk error"):
        average_hf_models(dirs, out)
    assert [p.name for p in out.iterdir()] == ["previous"]


def test_cli_averages_and_names_a_missing_step(tmp_path, capsys):
    dirs = [_write_weights(tmp_path / f"step_{s}", _random_weights(s)) for s in (100, 200)]
    argv = ["--models", *map(str, dirs), "--steps", "100", "200", "--output", str(tmp_path / "avg")]
    assert average_main(argv) == 0
    assert json.loads((tmp_path / "avg" / "sftflow_average.json").read_text())["steps"] == [100, 200]

    argv = ["--models", str(dirs[0]), str(tmp_path / "step_300"), "--steps", "100", "300", "--output", "x"]
    assert average_main(argv) == 2
    err = capsys.readouterr().err
    assert "step 300: model directory" in err and "step_300 not found" in err


def test_snakemake_mode_reads_input_params_output_and_log(tmp_path):
    dirs = [_write_weights(tmp_path / f"step_{s}", _random_weights(s)) for s in (2, 4)]
    log = tmp_path / "average.log"

    class Params(SimpleNamespace):
        def get(self, key, default=None):
            return getattr(self, key, default)

    def smk(models, out):
        return SimpleNamespace(
            input=SimpleNamespace(models=[str(d) for d in models]),
            params=Params(steps=[2, 4]),
            output=SimpleNamespace(model=str(out)),
            log=[str(log)],
        )

    average_from_snakemake(smk(dirs, tmp_path / "avg"))
    assert json.loads((tmp_path / "avg" / "sftflow_average.json").read_text())["steps"] == [2, 4]
    assert "averaged 2 models" in log.read_text()
    with pytest.raises(SystemExit, match="step 4: model directory .*step_404 not found"):
        average_from_snakemake(smk([dirs[0], tmp_path / "step_404"], tmp_path / "avg2"))
    assert "step_404 not found" in log.read_text()


def test_check_average_steps_accepts_saved_steps_and_the_final_step():
    assert check_average_steps([300, 100, 200], save_period=100, max_num_steps=1000) == [100, 200, 300]
    assert check_average_steps([900, 950], save_period=100, max_num_steps=950) == [900, 950]
    assert check_average_steps(None, save_period=100, max_num_steps=1000) == []


def test_check_average_steps_matches_steps_exactly():
    # 100 is not 1000: with save_period 1000 only 1000 and the final step are ever saved
    with pytest.raises(SftflowError, match=r"step 100 is never saved.*training.save_period = 1000"):
        check_average_steps([100, 1000], save_period=1000, max_num_steps=2000)
    assert check_average_steps([1000, 2000], save_period=1000, max_num_steps=2000) == [1000, 2000]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([100, 150], r"'training.average_steps': step 150 is never saved.*training.save_period = 100"),
        ([100, 100], r"'training.average_steps': step 100 is listed twice"),
        ([0], r"'training.average_steps': 0 is not a positive integer step"),
        ([100, "200"], r"'training.average_steps': '200' is not a positive integer step"),
        ([True], r"True is not a positive integer step"),
        ([1100], r"step 1100 is after the last step \(training.max_num_steps = 1000\)"),
        ("100,200", r"expected a list of steps"),
    ],
)
def test_check_average_steps_rejects_steps_that_are_never_saved(steps, message):
    with pytest.raises(SftflowError, match=message):
        check_average_steps(steps, save_period=100, max_num_steps=1000)


# Peak RSS is read from /proc (VmHWM, reset to the current RSS just before averaging), not getrusage's
# ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (kept across exec), here pytest's.
RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch  # noqa: F401
    from sftflow.averaging import average_hf_models

    def status_bytes(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    dirs = [Path(d) for d in sys.argv[2:]]
    baseline = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    average_hf_models(dirs, Path(sys.argv[1]))
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM")}))
    """
)

MAKE_CHECKPOINTS = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from safetensors.torch import save_file

    for i, d in enumerate(sys.argv[2:]):
        Path(d).mkdir()
        tensors = {f"layer{j}.weight": torch.full((2048, 2048), float(i + j)) for j in range(int(sys.argv[1]))}
        save_file(tensors, f"{d}/model.safetensors", metadata={"format": "pt"})
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak RSS from Linux /proc")
def test_peak_memory_stays_below_one_and_a_half_checkpoints(tmp_path):
    num_tensors = 16  # 16 x 16 MiB float32 = 256 MiB per checkpoint
    checkpoint_bytes = num_tensors * 2048 * 2048 * 4
    dirs = [str(tmp_path / f"step_{i}") for i in range(4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINTS, str(num_tensors), *dirs], check=True, env=env)
    out = tmp_path / "avg"
    result = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(out), *dirs],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    increase = rss["peak"] - rss["baseline"]
    assert increase < 1.5 * checkpoint_bytes, f"peak RSS grew by {increase / 2**20:.0f} MiB"
    averaged = load_file(out / "model.safetensors")
    assert len(averaged) == num_tensors and torch.equal(averaged["layer3.weight"], torch.full((2048, 2048), 4.5))
