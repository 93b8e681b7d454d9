# The two commands of a fresh machine: `make demo` (the offline demo) and `make test` (the test suite).
# Both create .venv first (torch pinned to the CPU build; see requirements.txt).
VENV := .venv
STAMP := $(VENV)/.installed
CORES ?= 2
DEMO_TARGET ?= all
# pytest-xdist workers. More than the 2 cores CI has: many tests wait (on Slurm, an inference server, a
# subprocess's start-up) rather than compute, and a third worker fills that time (docs/benchmarks.md, "Test suite").
TEST_WORKERS ?= 3
PYTEST := $(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: demo test test-fast coverage lint install

# The pinned requirements, then the sftflow package itself (scripts/sftflow, editable): importable by every script,
# rule, test and job run with this venv's python.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) $(DEMO_TARGET)
	$(VENV)/bin/snakemake --cores 1 --report results/report.html

# The full suite: what CI runs (.ci/run). Prints the 25 slowest tests.
test: $(STAMP)
	$(PYTEST) --durations=25

# The fast tier for contributors (tests/README.md): every test not marked slow, in about 3 minutes.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" --durations=10

# Line coverage of the sftflow package by the fast tier and by the full suite, subprocesses included (pyproject.toml,
# [tool.coverage.*]); prints both totals and their ratio (tests/README.md has the last numbers).
coverage: $(STAMP)
	rm -rf .coverage-data && mkdir -p .coverage-data/fast .coverage-data/full
	SFTFLOW_COVERAGE_DIR=$(CURDIR)/.coverage-data/fast $(PYTEST) -m "not slow" --cov --cov-report=
	SFTFLOW_COVERAGE_DIR=$(CURDIR)/.coverage-data/full $(PYTEST) --cov --cov-report=
	$(VENV)/bin/python benchmarks/tier_coverage.py .coverage-data/fast/.coverage .coverage-data/full/.coverage

# ruff's rules are pyproject.toml's [tool.ruff.lint]: style, imports, bugbear, and too-many-arguments (PLR0913,
# at most 6: group the rest into a config object or a dataclass; tests are exempt, fixtures arrive as arguments).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile rules
