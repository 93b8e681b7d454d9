# sftflow: generated math solutions -> SFT data -> chained training jobs -> final_hf_model -> results/eval.json
from snakemake.utils import min_version

min_version("9.0")


# config/config.yaml is the offline demo: it applies only when no --configfile is given, so that a user's
# config file means exactly what it says, plus the schema's defaults (docs/experiments.md).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


from sftflow.config import (
    config_layers,
    validate_workflow_config,
    value_sources,
)

# Where each value comes from (schema default, which config file, --config): errors name it, and so does
# the report's config page (python scripts/show_config.py prints it too).
CONFIG_SOURCES = value_sources(config_layers(workflow.overwrite_configfiles, workflow.config_settings.config))
# Fills every default from config/schema.yaml and fails, naming the key, before any job starts.
validate_workflow_config(config, CONFIG_SOURCES)


wildcard_constraints:
    job=r"\d+",
    seed=r"\d+",
    benchmark=r"[A-Za-z0-9_\-]+",
    model=r"final|base|averaged|step_\d+",


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


# Each stage's config file, after every check above (a refused config writes none); the main process only.
if workflow.is_main_process:
    write_stage_configs(CONFIG_SOURCES)


rule all:
    default_target: True
    input:
        all_targets(),
