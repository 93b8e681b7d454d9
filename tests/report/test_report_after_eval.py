"""`snakemake --report report.html` works after any run that made results/eval.json (issue 12, item 7).

The full case (trained models: data, training, eval and config pages) is opened in Chromium by
test_snakemake_report.py. Here the other one: an eval of the base model alone trains nothing, and the report
must still build from what that run made, with no page of a stage that did not run.
"""

from __future__ import annotations

import pytest

from tests.conftest import copy_workflow, snakemake

pytestmark = pytest.mark.slow

BASE_ONLY = """
eval:
  models: [base]
  benchmarks: "demo:2"
  server_gpus: 0
  max_new_tokens: 16
  max_samples: 6
  concurrency: 2
"""


def test_report_after_a_base_model_only_eval(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "base.yaml").write_text(BASE_ONLY)
    config = ("--configfile", "config/config.yaml", "base.yaml")
    result = snakemake("--cores", "2", "results/eval.json", *config, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert not (workdir / "results" / "checkpoints").exists()  # nothing trained

    result = snakemake("--cores", "1", *config, "--report", "report.html", cwd=workdir)  # the default target
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    page = (workdir / "report.html").read_text()
    for name in ("eval.html", "config.html", "config.yaml"):
        assert f'"{name}"' in page or f"/{name}" in page, name
    for name in ("data_funnel.png", "training_curves.png"):
        assert name not in page, name
    assert "nothing was trained, so the report has no data or" in page
