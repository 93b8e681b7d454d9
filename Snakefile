# sftflow: generated math solutions -> SFT data -> chained training jobs -> final_hf_model -> results/eval.json
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))
from sftflow.config import validate_workflow_config  # noqa: E402

# Fills every default from config/schema.yaml and fails, naming the key, before any job starts.
validate_workflow_config(config)


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
