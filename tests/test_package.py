"""sftflow is an installed package: importable from anywhere with the venv's Python, complete without the
checkout (a non-editable install runs the workflow), installed into each conda env, and no file edits the path."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, WORKFLOW_PARTS, copy_parts

# Any use of the interpreter's module search path (insert, append, slice assignment...), and any import of the
# package through the folder it lives in: `pip install -e .` (the Makefile's venv set-up) is how sftflow is found.
PATH_EDIT = re.compile(r"\bsys\s*\.\s*path\b|\bsite\s*\.\s*addsitedir\b")
FOLDER_IMPORT = re.compile(r"^\s*(from|import)\s+scripts\b", re.MULTILINE)


def workflow_sources() -> list[Path]:
    """The repo's Python and Snakemake files: tracked or new, not ignored (.venv, results, ...)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split("\n")  # fmt: skip
        paths = [REPO / p for p in listed if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside hidden folders
        paths = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    return [p for p in paths if p.is_file() and (p.suffix in {".py", ".smk"} or p.name == "Snakefile")]


def test_no_file_edits_the_module_search_path_or_imports_the_package_by_its_folder():
    sources = workflow_sources()
    assert REPO / "Snakefile" in sources and REPO / "rules" / "common.smk" in sources
    found = [
        f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}: {match.group(0).strip()}"
        for path in sources
        for text in [path.read_text()]
        for pattern in (PATH_EDIT, FOLDER_IMPORT)
        for match in pattern.finditer(text)
    ]
    assert not found, "sftflow is installed (pip install -e .); remove:\n" + "\n".join(found)


def test_sftflow_imports_outside_the_repo_from_its_source_folder(tmp_path):
    """The venv's Python, started in an unrelated folder with no PYTHONPATH, finds the package (and the files it
    reads at run time) in the checkout's scripts/sftflow: the editable install the Makefile makes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import sftflow, sftflow.config as c, sftflow.prepare.prompts as p; "
        "print(sftflow.__file__); print(bool(c.load_schema()['properties']), any(p.PROMPTS_DIR.glob('*/*.yaml')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"`import sftflow` failed outside the repo (run `make install`):\n{out.stderr}"
    init, files = out.stdout.split("\n")[:2]
    assert Path(init) == REPO / "scripts" / "sftflow" / "__init__.py"
    assert files == "True True"


def _env_without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}


def _run(cmd: list, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _probe_import(python: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run([python, "-c", "import sftflow; print(sftflow.__file__)"], cwd, env)


def _venv_with_project_dependencies(venv: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A fresh venv (its python, its site-packages) that sees the project's dependencies (snakemake, jsonschema, pip,
    setuptools, ...) without installing them again: their folders listed in a .pth. A path listed in a .pth is only
    added, its own .pth files are not run, so the project venv's editable sftflow (a .pth there) stays invisible."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], venv, env)
    site_packages = Path(purelib.stdout.strip())
    project_site = [p for p in {*site.getsitepackages(), sysconfig.get_path("purelib")} if Path(p).is_dir()]
    (site_packages / "project-dependencies.pth").write_text("".join(f"{p}\n" for p in project_site))
    return python, site_packages


@pytest.mark.slow
def test_a_non_editable_install_runs_show_config_and_a_dry_run_without_the_package_source(tmp_path):
    """`pip install .` (a wheel, not editable) into a fresh venv, then show_config.py and `snakemake -n` of the
    demo in a workflow copy that has no scripts/sftflow and no config/schema.yaml: they can only use the
    installed copy, with the schema and prompt configs it ships."""
    env = _env_without_pythonpath()
    # What `pip install .` builds from: the project file and the package source (no setup.py: pure Python). A copy,
    # so that the build leaves no build/ or egg-info in the checkout.
    source = copy_parts(REPO, tmp_path / "source", ("pyproject.toml", "scripts/sftflow"))
    python, purelib = _venv_with_project_dependencies(tmp_path / "venv", env)
    workflow = copy_parts(REPO, tmp_path / "workflow", WORKFLOW_PARTS)
    shutil.rmtree(workflow / "scripts" / "sftflow")
    (workflow / "config" / "schema.yaml").unlink()

    before = _probe_import(python, workflow, env)
    assert before.returncode != 0 and "No module named 'sftflow'" in before.stderr, before.stdout + before.stderr

    # Offline and with the project's setuptools (--no-build-isolation --no-index); --target: into the venv's
    # site-packages, leaving the project venv's own (editable) install alone.
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    installed = _run([*pip, "--no-build-isolation", "--no-index", "--target", purelib, source], tmp_path, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (purelib / "sftflow" / "schema.yaml").is_file()

    after = _probe_import(python, workflow / "scripts", env)
    assert after.returncode == 0, after.stderr
    assert Path(after.stdout.strip()) == purelib / "sftflow" / "__init__.py"

    shown = _run([python, "scripts/show_config.py"], workflow, env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# effective config: schema defaults < config/config.yaml\n"), shown.stdout[:300]
    values = {line.split(":")[0].strip(): line for line in shown.stdout.splitlines()}
    assert values["output_dir"].endswith("# config/config.yaml")
    assert values["weight_decay"].endswith("# schema default")  # from the schema the package ships

    dry = _run([python, "-m", "snakemake", "-n", "--cores", "1"], workflow, env)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    assert "rule train_job:" in dry.stdout + dry.stderr and "rule prepare_data:" in dry.stdout + dry.stderr


@pytest.mark.slow
def test_the_conda_post_deploy_script_installs_the_checkouts_package_into_the_active_env(tmp_path):
    """envs/<env>.post-deploy.sh, as Snakemake runs it after creating a conda env (the env active, the working
    directory the checkout): afterwards that env's python imports sftflow from the checkout, anywhere."""
    env = _env_without_pythonpath()
    rules_envs = {
        m for smk in (REPO / "rules").glob("*.smk") for m in re.findall(r'"\.\./envs/(\w+)\.yaml"', smk.read_text())
    }
    assert rules_envs and all((REPO / "envs" / f"{name}.post-deploy.sh").is_file() for name in rules_envs)
    for name in rules_envs:
        conda_env = yaml.safe_load((REPO / "envs" / f"{name}.yaml").read_text())
        (pip,) = [d["pip"] for d in conda_env["dependencies"] if isinstance(d, dict)]
        assert {"jsonschema", "PyYAML"} <= {r.split("==")[0] for r in pip}, (
            f"envs/{name}.yaml: sftflow.config needs them"
        )
    checkout = copy_parts(REPO, tmp_path / "checkout", ("pyproject.toml", "scripts/sftflow", "envs"))
    python, _ = _venv_with_project_dependencies(tmp_path / "venv", env)
    # The env "activated"; offline, with the project's setuptools (in CI as here; a real env build has the network).
    active = env | {"PATH": f"{python.parent}:{env['PATH']}", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused = _run(["bash", checkout / "envs" / "data.post-deploy.sh"], elsewhere, active)
    assert refused.returncode == 1 and f"{elsewhere} is not the sftflow checkout" in refused.stderr, refused.stderr

    deployed = _run(["bash", checkout / "envs" / "data.post-deploy.sh"], checkout, active)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    probe = _probe_import(python, elsewhere, env)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == checkout / "scripts" / "sftflow" / "__init__.py"
