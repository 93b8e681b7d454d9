"""Small HTML pages of pandas tables (figures are in sftflow.report.figures; this module needs no matplotlib,
so the eval summary, in the eval environment, writes its page with it).

Every writer goes through `atomic_path`, so a failed report job never leaves a half-written asset.
"""

from __future__ import annotations

import html
import json
import numbers
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sftflow.io import atomic_path

MISSING = "—"
PLUS_MINUS = "±"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1e293b; }
h1 { font-size: 1.4rem; margin: 0 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 0.4rem; }
p.note { max-width: 60rem; color: #475569; margin: 0.2rem 0 0.6rem; }
table.sftflow { border-collapse: collapse; font-size: 0.9rem; }
table.sftflow th { background: #e2e8f0; text-align: left; padding: 0.3rem 0.7rem; border-bottom: 2px solid #94a3b8; }
table.sftflow td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #e2e8f0; vertical-align: top; }
table.sftflow tr:nth-child(even) td { background: #f8fafc; }
pre { background: #f1f5f9; padding: 0.8rem 1rem; border-radius: 4px; font-size: 0.85rem; overflow-x: auto; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{css}{table_css}</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def format_value(value) -> str:
    """How a number or text appears in a report table: 1,234 / 0.9005 / 45.2 / 6.667e-05 / — for missing."""
    if is_missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return f"{float(value):,.0f}" if abs(value) >= 1000 else f"{float(value):.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, numbers.Real) and bool(np.isnan(value)))


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and not is_missing(value)


def _reads_as_number(value) -> bool:
    return is_number(value) or (isinstance(value, str) and f" {PLUS_MINUS} " in value)


@dataclass
class Section:
    """One heading of an HTML page: a note, then a table (or preformatted text)."""

    heading: str
    table: pd.DataFrame | None = None
    note: str = ""
    preformatted: str | None = None


def table_html(frame: pd.DataFrame, table_id: str) -> tuple[str, str]:
    """(table HTML, CSS right-aligning its numeric columns) for a frame of raw values, formatted by format_value."""
    numeric = []
    for i, col in enumerate(frame.columns, start=1):
        values = [v for v in frame[col] if not is_missing(v)]
        if values and all(map(_reads_as_number, values)):
            numeric.append(i)
    shown = frame.map(format_value) if not frame.empty else frame
    body = shown.to_html(index=False, border=0, classes="sftflow", table_id=table_id, escape=True, na_rep=MISSING)
    css = "".join(f"\n#{table_id} td:nth-child({i}) {{ text-align: right; white-space: nowrap; }}" for i in numeric)
    return body, css


def write_html_page(path: str | os.PathLike, title: str, sections: list[Section]) -> None:
    parts, table_css = [], []
    for number, section in enumerate(sections):
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.table is not None:
            body, css = table_html(section.table, f"t{number}")
            parts.append(body)
            table_css.append(css)
        if section.preformatted is not None:
            parts.append(f"<pre>{html.escape(section.preformatted)}</pre>")
    page = PAGE.format(title=html.escape(title), css=CSS, table_css="".join(table_css), body="\n".join(parts))
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
