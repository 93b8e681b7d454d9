"""training.conversion_step as NeMo-Skills': final_hf_model is made from that step; training.export_steps
exports others beside it; a step the run never saves is refused while planning."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL_TRAINING, copy_with_data, rules_run, snakemake


def weights(model_dir):
    """Every tensor of an exported model, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors, f"no weights in {model_dir}"
    return tensors


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_conversion_step_makes_the_final_model_from_that_step_and_unreachable_steps_are_refused(
    small_demo_run, tmp_path
):
    # SMALL_TRAINING: 2 chained jobs of 6 steps, save_period 5: steps 5, 6, 10 and 12 are saved.
    workdir = copy_with_data(small_demo_run, tmp_path / "run")
    (workdir / "small.yaml").write_text(SMALL_TRAINING + "  conversion_step: 5\n  export_steps: [5, 12]\n")
    config = ("--configfile", "config/config.yaml", "small.yaml")
    targets = ("results/final_hf_model", "results/hf_models/step_5", "results/hf_models/step_12")
    result = snakemake("--cores", "2", *targets, *config, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = workdir / "results"
    final, step5, step12 = (weights(results / p) for p in ("final_hf_model", "hf_models/step_5", "hf_models/step_12"))
    assert same_weights(final, step5)
    assert not same_weights(final, step12)  # the control: the last step is another model
    assert json.loads((results / "checkpoints" / "job1.done").read_text())["end_step"] == 12

    # conversion_step is a rerun trigger of the final model only: null makes it from the last step again.
    (workdir / "small.yaml").write_text(SMALL_TRAINING + "  export_steps: [5, 12]\n")
    result = snakemake("--cores", "2", *targets, *config, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert rules_run(result.stderr) == ["convert_final"], result.stderr[-4000:]
    assert same_weights(weights(results / "final_hf_model"), step12)

    # With the data packed, a step after the data's last epoch is refused while planning (same workdir).
    sequences = json.loads((workdir / "results" / "data" / "packed" / "index.json").read_text())["num_sequences"]
    last = 2 * (sequences // 4)  # max_num_epochs 2 x steps per epoch (train_global_batch_size 4)
    (workdir / "small.yaml").write_text(
        SMALL_TRAINING.replace("max_num_steps: 12", "max_num_steps: 100000\n  max_num_epochs: 2").replace(
            "save_period: 5", "save_period: 1"
        )
        + f"  conversion_step: {last + 1}\n"
    )
    result = snakemake("-n", "results/final_hf_model", "--configfile", "config/config.yaml", "small.yaml", cwd=workdir)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert (
        f"config key 'training.conversion_step': step {last + 1} is after the last step "
        f"({last} = training.max_num_epochs = 2 x {sequences // 4} steps per epoch" in log
    ), log[-4000:]
    assert "train_job" not in rules_run(result.stdout)


@pytest.mark.slow
def test_a_step_that_is_never_saved_is_refused_before_the_data_exists(workdir):
    (workdir / "small.yaml").write_text(SMALL_TRAINING + "  export_steps: [7]\n")
    result = snakemake("-n", "--configfile", "config/config.yaml", "small.yaml", cwd=workdir)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "config key 'training.export_steps': step 7 is never saved" in log, log[-4000:]
    assert "training.save_period = 5" in log
