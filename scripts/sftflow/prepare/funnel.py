"""The funnel of a prepare_data run: where each row read went (skipped, invalid, not selected, dropped by which stage,
written), gathered from the blocks' results and written as the stats JSON; and its summary for the log."""

from __future__ import annotations

from dataclasses import dataclass, field

from sftflow.prepare.filters import RowFilter
from sftflow.prepare.rows import LABELS, SELECTION_KEYS, BlockResult, LengthStage

MAX_EXAMPLES = 20  # invalid rows listed in the stats (the count is always complete)


@dataclass
class Funnel:
    """The counters of a run. Row filters and length stages are the main process's; the workers' counts are added
    to them block by block (add_block)."""

    filters: list[RowFilter]  # the row filters, in order
    length_stages: list[LengthStage]
    skipped_stages: list[dict]  # stages switched on with nothing to do
    deduplicate: bool
    input_files: list[dict] = field(default_factory=list)  # per file: path, rows, skipped_first, invalid
    invalid_count: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    selection: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SELECTION_KEYS, 0))
    length_totals: list[list[int]] = field(init=False)  # per length stage: rows_in, too short, too long
    deduplicated: dict = field(default_factory=lambda: {"stage": "deduplicate", "rows_in": 0, "dropped": 0})
    # The stages of ordering (sftflow.prepare.ordering), when they ran: each its funnel record.
    code_text_filter: dict | None = None
    downsampling: dict | None = None
    rows_written: int = 0

    def __post_init__(self):
        self.length_totals = [[0, 0, 0] for _ in self.length_stages]

    def add_block(self, info: dict, result: BlockResult) -> None:
        """Count a block's result (`info`: its file's counts)."""
        info["rows"] += result.rows_read
        for key, count in result.selection.items():
            self.selection[key] += count
        info["invalid"] += len(result.invalid)
        self.invalid_count += len(result.invalid)
        self.invalid_examples.extend(result.invalid[: MAX_EXAMPLES - len(self.invalid_examples)])
        for stage, counts in zip(self.filters, result.filters):
            stage.add_counts(counts)
        for totals, counts in zip(self.length_totals, result.lengths_filtered):
            totals[:] = [a + b for a, b in zip(totals, counts)]
        if self.deduplicate:
            self.deduplicated["rows_in"] += len(result.lengths) + result.repeats
            self.deduplicated["dropped"] += result.repeats

    def stages(self) -> list[dict]:
        """The funnel's stages in the order rows meet them, each with rows_in and dropped."""
        funnel = self.skipped_stages + [stage.stats() for stage in self.filters]
        for stage, (rows_in, too_short, too_long) in zip(self.length_stages, self.length_totals):
            funnel.append(
                {
                    "stage": stage.stage,
                    "field": stage.field,
                    "min": stage.min,
                    "max": stage.max,
                    "rows_in": rows_in,
                    "dropped_too_short": too_short,
                    "dropped_too_long": too_long,
                    "dropped": too_short + too_long,
                }
            )
        if self.deduplicate:
            funnel.append(self.deduplicated)
        funnel += [stage for stage in (self.code_text_filter, self.downsampling) if stage is not None]
        return funnel

    def stats(self, output_path: str, formatting: dict, seconds: float) -> dict:
        """The stats JSON; raises if a row read is not accounted for."""
        funnel = self.stages()
        selection = self.selection
        stats = {
            "input_files": self.input_files,
            "invalid_rows": {"count": self.invalid_count, "examples": self.invalid_examples},
            "selection": selection,
            "rows_written": self.rows_written,
            "rows_read": sum(f["rows"] for f in self.input_files),
            "skipped_first": sum(f["skipped_first"] for f in self.input_files),
            "funnel": funnel,
            "dropped_by_selection": sum(selection[f"{k}_seen"] - selection[f"{k}_kept"] for k in LABELS),
            "output_path": output_path,
            "formatting": formatting,
            "seconds": seconds,
        }
        accounted = (
            stats["skipped_first"]
            + self.invalid_count
            + stats["dropped_by_selection"]
            + sum(stage["dropped"] for stage in funnel)
            + self.rows_written
        )
        if accounted != stats["rows_read"]:  # every row must be accounted for somewhere in the funnel
            raise RuntimeError(f"internal error: funnel accounts for {accounted} rows of {stats['rows_read']} read")
        return stats


def empty_output_reason(stats: dict, filter_names) -> str:
    """Why no row was written: the step of the funnel that removed the most rows, and the key that keeps them
    (`filter_names`: the names under `filters:` in the config)."""
    sel = stats["selection"]
    causes = []  # (rows removed, what removed them, the key that keeps them)
    for label in LABELS:
        lost = sel[f"{label}_seen"] - sel[f"{label}_kept"]
        if lost:
            hint = f"add_{label}=true"
            if label == "unlabeled":
                hint += " (rows without a correctness label: no symbolic_correct / is_correct / judgement)"
            causes.append((lost, f"selection dropped {lost} {label} rows", hint))
    for stage in stats["funnel"]:
        if stage.get("dropped"):
            name = stage["stage"]
            if name in filter_names:
                key = f"filters.{name}=false"
            elif name == "deduplicate":
                key = "deduplicate=false"
            else:
                key = "the settings of this step (the funnel above lists them)"
            causes.append((stage["dropped"], f"{name} dropped {stage['dropped']}", key))
    if stats["invalid_rows"]["count"]:
        causes.append((stats["invalid_rows"]["count"], f"{stats['invalid_rows']['count']} invalid rows", "the input"))
    if stats["skipped_first"]:
        causes.append((stats["skipped_first"], f"skip_first skipped {stats['skipped_first']}", "skip_first"))
    read = stats["rows_read"]
    if not causes:
        return f"prepare_data wrote 0 rows: the input files hold no rows ({read} read)"
    lost, what, key = max(causes, key=lambda c: c[0])
    others = "; ".join(c[1] for c in causes if c[1] != what)
    return (
        f"prepare_data wrote 0 of {read} rows read: {what}"
        + (f" ({others})" if others else "")
        + f". To keep them: {key}"
    )


def summary_lines(stats: dict) -> list[str]:
    """The funnel as log lines a user can read."""
    lines = [f"read {stats['rows_read']} rows from {len(stats['input_files'])} file(s)"]
    if stats["skipped_first"]:
        lines.append(f"  skipped (skip_first): {stats['skipped_first']}")
    if stats["invalid_rows"]["count"]:
        lines.append(f"  invalid rows skipped: {stats['invalid_rows']['count']}")
    sel = stats["selection"]
    for k in LABELS:
        lines.append(f"  {k}: {sel[f'{k}_seen']} seen, {sel[f'{k}_kept']} kept")
    for st in stats["funnel"]:
        if "skipped" in st:
            lines.append(f"  {st['stage']}: skipped ({st['skipped']})")
            continue
        extra = f", modified {st['modified']}" if st.get("modified") else ""
        lines.append(f"  {st['stage']}: {st['rows_in']} in, dropped {st['dropped']}{extra}")
        for match in st.get("matches", [])[:10]:
            how = (
                f" ({match['how']} match with {match['benchmark']}: {match['matched_problem']!r})"
                if "how" in match
                else ""
            )
            lines.append(f"    contaminated: {match['problem']!r}{how}")
        if len(st.get("matches", [])) > 10:
            lines.append(f"    ... {len(st['matches']) - 10} more in the stats file")
    lines.append(f"wrote {stats['rows_written']} rows to {stats['output_path']}")
    return lines
