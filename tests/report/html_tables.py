"""Tables of an HTML page as lists of rows of cell text (stdlib only: pandas.read_html needs lxml)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def html_tables(page: str | Path) -> list[list[list[str]]]:
    """[table][row][cell] of `page` (HTML text, or a path to an HTML file); the header is row 0."""
    text = page.read_text(encoding="utf-8") if isinstance(page, Path) else page
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def table_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    header, *rows = table
    return [dict(zip(header, row)) for row in rows]
