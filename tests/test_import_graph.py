"""The package's import graph: no cycles, and the trainer, export and config checks reach a backend only
through the registry (sftflow.train.engine), never by importing one or naming one."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow.train.engine import BACKENDS

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PACKAGE = SCRIPTS / "sftflow"
# Modules that must work for any backend.
BACKEND_BLIND = (
    "sftflow.config",
    "sftflow.train.config",
    "sftflow.train.trainer",
    "sftflow.train.export",
    "sftflow.train.cli",
    "sftflow.train.launch",
    "sftflow.train.export_cli",
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SCRIPTS).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sftflow modules that `name` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_among_sftflow_modules(graph):
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _backend_modules() -> set[str]:
    return {target.partition(":")[0] for backend in BACKENDS.values() for target in (backend.engine, backend.checks)}


def test_trainer_export_and_config_import_no_backend(graph):
    backends = _backend_modules()
    backend_packages = {m.rpartition(".")[0] for m in backends if not m.startswith("sftflow.train.")}
    for module in BACKEND_BLIND:
        reached, todo = set(), [module]
        while todo:
            for target in graph[todo.pop()] - reached:
                reached.add(target)
                todo.append(target)
        leaked = sorted(m for m in reached if m in backends or m.rpartition(".")[0] in backend_packages)
        assert not leaked, f"{module} imports backend modules {leaked}"


def test_trainer_export_and_config_name_no_backend():
    for module in BACKEND_BLIND:
        path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
        names = [
            node.value
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and node.value in BACKENDS
        ]
        assert not names, f"{module} names backends {names}; dispatch through sftflow.train.engine"


def test_config_checks_of_every_backend_import_no_torch():
    code = (
        "import sys; from sftflow.train.engine import BACKENDS, config_check\n"
        "for name in BACKENDS: config_check(name)\n"
        "import sftflow.config, sftflow.train.config\n"
    )
    run_without_torch(code)


def test_the_planning_time_checkpoint_check_reads_a_checkpoint_without_torch(tmp_path):
    """The Snakefile calls check_checkpoint_matches while planning: every snakemake call (dry runs, each Slurm
    job step) would pay torch's import (~5 s) if finding and reading the latest checkpoint imported it."""
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"training": {"learning_rate": 0.001}}')
    code = (
        "import sys\n"
        "from sftflow.errors import SftflowError\n"
        "from sftflow.train.config import check_checkpoint_matches\n"
        "try:\n"
        f"    check_checkpoint_matches({str(step.parent)!r}, {{'learning_rate': 0.002}})\n"
        "except SftflowError as err:\n"
        "    assert 'training.learning_rate: 0.001 there, 0.002 now' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('the changed learning rate was not refused')\n"
    )
    run_without_torch(code)


def run_without_torch(code: str) -> None:
    """Run `code` in a fresh interpreter, then check it never imported torch."""
    check = "import sys\nassert 'torch' not in sys.modules, 'torch imported'\n"
    result = subprocess.run(
        [sys.executable, "-c", code + check], capture_output=True, text=True, env={"PYTHONPATH": str(SCRIPTS)}
    )
    assert result.returncode == 0, result.stderr


def test_prepare_data_runs_and_pack_data_imports_without_torch(tmp_path):
    """The data stages need no torch: importing it cost prepare_data ~3 s of start-up (against ~4 s for the orjson
    floor at 1M rows in benchmarks/prepare_data_bench.py), through sftflow.packing's package imports. (A
    tokenizer still brings torch in: transformers' AutoTokenizer imports it whenever it is installed.)"""
    src = tmp_path / "generated.jsonl"
    rows = [
        {"problem": f"What is {i} + 1?", "generation": f"It is \\boxed{{{i + 1}}}.", "symbolic_correct": True}
        for i in range(4)
    ]
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sft = tmp_path / "sft.jsonl"
    code = (
        "from sftflow.prepare.cli import main as prepare\n"
        f"assert prepare(['++input_files={src}', '++output_path={sft}', '++filters.split_arithmetic=true']) == 0\n"
        "import sftflow.packing.cli\n"
    )
    run_without_torch(code)
    assert len(sft.read_text().splitlines()) == 4
