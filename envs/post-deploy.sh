#!/usr/bin/env bash
# Installs the sftflow package into a conda env of this workflow. Snakemake runs envs/<env>.post-deploy.sh (each a
# link to this file) once, right after it creates the env from envs/<env>.yaml (`--sdm conda`), with the env
# activated and in Snakemake's working directory. The env file cannot list the package itself: Snakemake copies
# it to .snakemake/conda/<hash>.yaml before `conda env create`, so a relative path there (`-e ..`) would name
# .snakemake/, not the checkout.
#
# Editable, without dependencies (the env file pins them): the env's hash covers its env file and this script,
# not the package's code, so a copy would keep running old code after a change; an editable install runs the
# checkout's current sftflow, as the Makefile's venv does. Snakemake builds the env under the working directory
# (.snakemake/conda, unless --conda-prefix), so a checkout gets envs of its own.
set -euo pipefail
checkout=${SFTFLOW_CHECKOUT:-$PWD}
if [[ ! -f $checkout/pyproject.toml || ! -f $checkout/scripts/sftflow/__init__.py ]]; then
    echo "envs/post-deploy.sh: $checkout is not the sftflow checkout (no pyproject.toml and scripts/sftflow):" \
        "run snakemake in the checkout, or set SFTFLOW_CHECKOUT to it" >&2
    exit 1
fi
python -m pip install --quiet --disable-pip-version-check --no-deps --editable "$checkout"
python -c 'import sftflow.config as c; c.load_schema()'  # the package and its schema, from this env's python
