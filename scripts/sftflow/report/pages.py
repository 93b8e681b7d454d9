"""The report's page files and which rule writes each (light: the Snakefile reads it while planning)."""

from __future__ import annotations

# field name (the rule's output name) -> file name under OUTPUT_DIR/report
FILE_NAMES = {
    "data_funnel": "data_funnel.png",
    "data_prep": "data_prep.html",
    "contamination": "contamination.html",
    "packing": "packing.html",
    "training_curves": "training_curves.png",
    "throughput": "throughput.png",
    "training_summary": "training_summary.html",
    "eval_results": "eval.html",
    "config_html": "config.html",
    "config_yaml": "config.yaml",
}

# rule -> the fields it writes (rules/report.smk; eval_summary in rules/eval.smk writes the eval page)
RULE_PAGES = {
    "report_data": ("data_funnel", "data_prep", "contamination", "packing"),
    "report_training": ("training_curves", "throughput", "training_summary"),
    "report_config": ("config_html", "config_yaml"),
    "eval_summary": ("eval_results",),
}
