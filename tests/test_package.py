"""sftflow is an installed package: importable from anywhere with the venv's Python, and no file edits the path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

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
        "print(sftflow.__file__); print(c.SCHEMA_PATH.is_file(), any(p.PROMPTS_DIR.glob('*/*.yaml')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"`import sftflow` failed outside the repo (run `make install`):\n{out.stderr}"
    init, files = out.stdout.split("\n")[:2]
    assert Path(init) == REPO / "scripts" / "sftflow" / "__init__.py"
    assert files == "True True"
