"""Code shape the next engineer relies on: no function in scripts/ longer than MAX_LINES unless its docstring
says why (a line starting "Long because")."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MAX_LINES = 80


def long_functions(root: Path = SCRIPTS, max_lines: int = MAX_LINES) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            explained = "Long because" in (ast.get_docstring(node) or "")
            if length > max_lines and not explained:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_scripts_is_longer_than_80_lines_without_saying_why():
    assert long_functions() == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    '''Long because: a table.'''\n{body}\n")
    assert long_functions(tmp_path) == [f"m.py:1 f ({MAX_LINES + 1} lines)"]
