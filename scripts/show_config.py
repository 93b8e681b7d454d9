"""Print the effective config of an experiment, each value with where it comes from.

    python scripts/show_config.py [--configfile my.yaml [more.yaml ...]] [--config KEY=VALUE ...]

The same layers as `snakemake ... --configfile my.yaml --config KEY=VALUE`: the schema's defaults, then
config/config.yaml of the workflow checkout this script is in (the offline demo) only when no --configfile is
given, then each --configfile in order, then --config (parsed by Snakemake's own parser). The config is validated
as the workflow validates it: an error names each key, its value and its source, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snakemake.cli import parse_config

from sftflow.config import (
    config_layers,
    effective_config_yaml,
    merged_layers,
    validate_workflow_config,
    value_sources,
)
from sftflow.errors import SftflowError

WORKFLOW_DIR = Path(__file__).resolve().parents[1]  # the workflow checkout (its demo config), not the package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # As Snakemake takes them: several files or KEY=VALUE items after one flag, or the flag repeated.
    parser.add_argument("--configfile", nargs="+", action="extend", default=[], help="config files, in order")
    parser.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="as snakemake's")
    args = parser.parse_args(argv)
    try:  # Snakemake's own parser: top-level values typed, nested ones (training={...}) kept as strings
        cli_config = parse_config(args.config)
    except ValueError as err:
        parser.error(f"--config: {err}")
    try:
        layers = config_layers(args.configfile, cli_config, workflow_dir=WORKFLOW_DIR)
        config = merged_layers(layers)
        sources = value_sources(layers)
        validate_workflow_config(config, sources)
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"# effective config: {' < '.join(['schema defaults', *(name for name, _ in layers)])}")
    sys.stdout.write(effective_config_yaml(config, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
