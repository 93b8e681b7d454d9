# The two commands of a fresh machine: `make demo` (the offline demo) and `make test` (the test suite).
# Both create .venv first (torch pinned to the CPU build; see requirements.txt).
VENV := .venv
STAMP := $(VENV)/.installed
CORES ?= 2
DEMO_TARGET ?= all

.PHONY: demo test lint install

# The pinned requirements, then the sftflow package itself (scripts/sftflow, editable): importable by every script,
# rule, test and job run with this venv's python. That install also compiles its C text scans in place (setup.py).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml setup.py scripts/sftflow/_scan.c
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) $(DEMO_TARGET)
	$(VENV)/bin/snakemake --cores 1 --report results/report.html

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules
