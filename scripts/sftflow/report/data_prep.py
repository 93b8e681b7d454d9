"""The data-preparation funnel, the decontamination matches behind it, and the sequences pack_data tokenized."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from sftflow.mathtext import normalize_problem
from sftflow.report.figures import new_figure, save_png
from sftflow.report.render import Section, format_value, write_html_page

STAGE_KEYS = ("stage", "rows_in", "dropped", "modified")
FUNNEL_COLUMNS = ["stage", "rows in", "dropped", "modified", "rows out", "details"]
MAX_CONTAMINATION_ROWS = 5000  # a page of a few MB at most; the full list stays in the contamination file


def _details(stage: dict) -> str:
    """Every fact of a stage beyond its counters, e.g. 'contaminated problems: 10; max: 200'."""
    return "; ".join(
        f"{key.replace('_', ' ')}: {format_value(value)}"
        for key, value in stage.items()
        if key not in STAGE_KEYS and not isinstance(value, list | dict)  # e.g. the matches: a page of their own
    )


def funnel_frame(stats: dict) -> pd.DataFrame:
    """One row per step from rows read to rows written; every dropped row appears in exactly one row."""
    rows = []
    remaining = stats["rows_read"]

    def add(stage, dropped, modified=None, details="", rows_in=None):
        nonlocal remaining
        rows_in = remaining if rows_in is None else rows_in
        remaining = rows_in - (dropped or 0)
        rows.append([stage, rows_in, dropped, modified, remaining, details])

    files = stats.get("input_files", [])
    rows.append(["read", None, None, None, remaining, f"{len(files)} input file(s)"])
    if stats.get("skipped_first"):
        add("skip_first", stats["skipped_first"])
    invalid = stats.get("invalid_rows", {}).get("count", 0)
    if invalid:
        add("invalid rows (skip_invalid_rows)", invalid)
    selection = stats.get("selection")
    if selection:
        kinds = ("correct", "incorrect", "unlabeled")
        dropped = stats.get("dropped_by_selection", sum(selection[f"{k}_seen"] - selection[f"{k}_kept"] for k in kinds))
        kept = "; ".join(f"{k}: {selection[f'{k}_kept']:,} of {selection[f'{k}_seen']:,} kept" for k in kinds)
        add("selection (add_correct / add_incorrect / add_unlabeled)", dropped, details=kept)
    for stage in stats["funnel"]:
        if "skipped" in stage:
            add(stage["stage"], 0, details=f"skipped: {stage['skipped']}")
        else:
            add(stage["stage"], stage.get("dropped", 0), stage.get("modified"), _details(stage), stage.get("rows_in"))
    rows.append(["written", None, None, None, stats["rows_written"], stats.get("output_path", "")])
    return pd.DataFrame(rows, columns=FUNNEL_COLUMNS)


def funnel_plot_height(num_rows: int) -> float:
    return 1.4 + 0.36 * num_rows


def plot_funnel(funnel: pd.DataFrame, path: str | os.PathLike) -> None:
    """Horizontal bars: rows left after each step, top to bottom, each labelled with what the step removed."""
    fig, (ax,) = new_figure(funnel_plot_height(len(funnel)))
    positions = list(range(len(funnel)))[::-1]
    dropped = funnel["dropped"].fillna(0).astype(int)
    colors = ["#2563eb" if d > 0 else "#94a3b8" for d in dropped]
    colors[0] = colors[-1] = "#0f766e"
    ax.barh(positions, funnel["rows out"], color=colors, height=0.7)
    ax.set_yticks(positions, funnel["stage"].map(lambda s: s.split(" (")[0]))
    top = float(funnel["rows out"].max())
    for y, (_, row) in zip(positions, funnel.iterrows()):
        text = f"{int(row['rows out']):,}"
        if row["dropped"] and row["dropped"] > 0:
            text += f"   −{int(row['dropped']):,}"
        if row["modified"] and row["modified"] > 0:
            text += f"   ({int(row['modified']):,} modified)"
        ax.text(row["rows out"] + top * 0.01, y, text, va="center", fontsize=9)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("rows left after the step (−dropped by it)")
    ax.set_title("Data preparation: rows read → rows written")
    ax.spines[["top", "right"]].set_visible(False)
    save_png(fig, path)


def contamination_frame(matches: pd.DataFrame) -> pd.DataFrame:
    """The matches, the ones worth a look first.

    First come 'exact' matches whose two texts differ after today's normalize_problem (a contamination file
    made by other code, or a false positive), then n-gram matches by rising overlap, then true exact copies.
    """
    columns = {
        "line": "line in file",
        "problem": "training problem",
        "benchmark": "benchmark",
        "matched_problem": "benchmark problem it matched",
        "how": "match",
        "overlap": "overlap",
        "same_normalised": "same text after normalising",
    }
    if "line" not in matches:  # the stats' list: no line numbers
        del columns["line"]
    if matches.empty:
        return pd.DataFrame(columns=list(columns.values()))
    frame = matches.reindex(columns=list(columns)[:-1])
    frame["same_normalised"] = [
        isinstance(a, str) and isinstance(b, str) and normalize_problem(a) == normalize_problem(b)
        for a, b in zip(frame["problem"], frame["matched_problem"])
    ]
    exact = frame["how"].eq("exact")
    frame["_rank"] = np.select([exact & ~frame["same_normalised"], ~exact], [0, 1], default=2)
    frame = frame.sort_values(["_rank", "overlap"], kind="stable").drop(columns="_rank")
    if "line" in frame:
        frame["line"] = frame["line"].astype(str)  # a line number, not a count: no thousands separator
    return frame.rename(columns=columns).reset_index(drop=True)


def contamination_sections(
    stats: dict, contamination_file: str | None, checked: int | None, file_matches: pd.DataFrame | None
) -> list[Section]:
    """The matches remove_contaminated applied: listed in sft.stats.json, or else read from the contamination file."""
    stage = next((s for s in stats["funnel"] if s["stage"] == "remove_contaminated"), None)
    if stage is None:
        return [Section("Decontamination", note="filters.remove_contaminated is off: no training row was removed.")]
    if "skipped" in stage:
        return [Section("Decontamination", note=f"remove_contaminated was skipped ({stage['skipped']}).")]
    listed_in_stats = "matches" in stage
    if listed_in_stats:
        matches = pd.DataFrame(stage["matches"])
    elif file_matches is not None:
        matches = file_matches
    else:
        return [
            Section(
                "Decontamination",
                note=f"sft.stats.json lists no matches (an older prepare_data wrote it) and no contamination file "
                f"was given; the matches are in {stage.get('contamination_file', 'the contamination file')}.",
            )
        ]
    frame = contamination_frame(matches)
    source = stage.get("contamination_file", contamination_file)
    note = f"Decontamination ({source}) matched {len(frame):,} training problems to evaluated benchmark problems"
    if checked:
        note += f", of {checked:,} distinct training problems checked"
    note += (
        f"; remove_contaminated dropped the {stage['dropped']:,} training rows with one of them (compared after "
        "normalising case, spacing and punctuation). Listed first are the ones to check by eye: 'exact' matches "
        "whose texts differ after normalising (a stale contamination file, or a false positive), then n-gram "
        "matches, least overlap first."
    )
    total = len(file_matches) if file_matches is not None else stage.get("contaminated_problems", 0)
    shown = min(len(frame), MAX_CONTAMINATION_ROWS)
    if shown < total:
        where = "sft.stats.json lists" if listed_in_stats and shown == len(frame) else "this page shows"
        note += f" Only {shown:,} of {total:,} are listed ({where} at most that many); all are in {source}."
    return [Section("Matches removed by decontamination", frame.head(MAX_CONTAMINATION_ROWS), note)]


# (label, key path) of pack_data's stats in reading order; keys not listed follow under their own names. pack_data
# only tokenizes: the trainer packs each step's sequences (training.packing_in_training_frame shows how full).
PACKING_KEYS = (
    ("sequences kept", ("sequences_kept",)),
    ("rows read", ("rows_read",)),
    ("total tokens", ("total_tokens",)),
    ("loss tokens", ("loss_tokens",)),
    ("loss tokens / total tokens", ("loss_token_fraction",)),
    ("mean sequence length", ("mean_sequence_length",)),
    ("max sequence length", ("max_sequence_length",)),
    ("tokens per bin in training (max_total_sequence_length)", ("max_total_sequence_length",)),
    ("packing in training", ("packing",)),
    ("packing algorithm in training", ("algorithm",)),
    ("shards", ("shards",)),
    ("rows held out for validation (training.val_set_size)", ("held_out", "held_out_rows")),
    ("problems held out for validation", ("held_out", "held_out_problems")),
    ("rows left for training", ("held_out", "training_rows")),
    ("problems left for training", ("held_out", "training_problems")),
)
# The over-long sequences and the dropped ones: a table of their own, every key of these two objects in it.
OVERLONG_KEYS = (
    ("over-long sequences (more tokens than max_total_sequence_length)", ("overlong", "count")),
    ("over-long action", ("overlong", "action")),
    ("over-long sequences masked (kept, no loss token)", ("overlong", "masked")),
    ("tokens masked (in masked over-long sequences)", ("overlong", "tokens_masked")),
    ("tokens truncated (cut off over-long sequences)", ("overlong", "tokens_truncated")),
    ("tokens dropped (in dropped over-long sequences)", ("overlong", "tokens_dropped")),
    ("sequences dropped: over-long", ("dropped", "overlong")),
    ("sequences dropped: no loss token", ("dropped", "no_loss_tokens")),
    ("sequences dropped: no loss token left after truncation", ("dropped", "no_loss_tokens_after_truncation")),
)
OVERLONG_GROUPS = ("overlong", "dropped")
OVERLONG_ACTIONS = {
    "mask": "kept in training, cut to a few tokens per message and with a loss mask of zeros: each still counts "
    "as one sequence of its optimizer step, and the model learns nothing from it (as NeMo-Skills' start_sft.py does)",
    "truncate": "cut to max_total_sequence_length tokens; the model trains on what is left",
    "drop": "left out of training",
}


def _flatten(obj: dict, prefix: tuple = ()) -> dict[tuple, object]:
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _statistics(flat: dict[tuple, object], listed: tuple) -> pd.DataFrame:
    """The listed keys first, under their labels, then the other keys of `flat` under their dotted names."""
    rows = [(label, flat.pop(keys)) for label, keys in listed if keys in flat]
    rows += [(".".join(keys), value) for keys, value in flat.items()]
    return pd.DataFrame(rows, columns=["statistic", "value"])


def packing_frame(stats: dict) -> pd.DataFrame:
    """pack_data's stats but the over-long and dropped sequences (overlong_frame): what training reads."""
    flat = {keys: v for keys, v in _flatten(stats).items() if keys[0] not in OVERLONG_GROUPS or len(keys) == 1}
    if isinstance(stats.get("loss_tokens"), int) and stats.get("total_tokens"):
        flat[("loss_token_fraction",)] = stats["loss_tokens"] / stats["total_tokens"]
    return _statistics(flat, PACKING_KEYS)


def overlong_frame(stats: dict) -> pd.DataFrame:
    """What pack_data did with sequences longer than max_total_sequence_length, and every sequence it dropped."""
    flat = {keys: v for keys, v in _flatten(stats).items() if keys[0] in OVERLONG_GROUPS and len(keys) > 1}
    return _statistics(flat, OVERLONG_KEYS)


def overlong_note(stats: dict) -> str:
    overlong = stats.get("overlong")
    if not isinstance(overlong, dict) or "count" not in overlong:
        return "pack_data's stats say nothing about over-long sequences."
    limit = stats.get("max_total_sequence_length", "max_total_sequence_length")
    action = overlong.get("action")
    if overlong["count"] == 0:
        return f"No sequence had more than {format_value(limit)} tokens (packing.overlong: {action})."
    note = f"{format_value(overlong['count'])} sequence(s) had more than {format_value(limit)} tokens"
    if action in OVERLONG_ACTIONS:
        note += f"; packing.overlong is {action}: {OVERLONG_ACTIONS[action]}"
    elif action is not None:
        note += f"; packing.overlong is {action}"
    if action == "mask" and "masked" in overlong:
        note += f". Masked: {format_value(overlong['masked'])}"
    return note + "."


def packing_sections(stats: dict, stats_path: str) -> list[Section]:
    """The packing page: pack_data's tokenized sequences, then its over-long and dropped ones."""
    return [
        Section(
            "Tokenized sequences",
            packing_frame(stats),
            f"From {stats_path}. pack_data tokenizes the training rows and stores one sequence each; the trainer "
            "packs each optimizer step's sequences into bins of at most max_total_sequence_length tokens, so how "
            "full the bins were is on the training summary page (Packing in training).",
        ),
        Section("Over-long and dropped sequences", overlong_frame(stats), overlong_note(stats)),
    ]


def write_data_prep_page(path: str | os.PathLike, stats: dict, funnel: pd.DataFrame) -> None:
    files = pd.DataFrame(stats.get("input_files", []))
    sections = [
        Section(
            "Funnel",
            funnel,
            f"{stats['rows_read']:,} rows read, {stats['rows_written']:,} written; every other row was dropped "
            "by exactly one step below (steps with 'modified' rewrote solutions without dropping them).",
        )
    ]
    if not files.empty:
        sections.append(Section("Input files", files))
    examples = stats.get("invalid_rows", {}).get("examples")
    if examples:
        sections.append(Section("Invalid rows (examples)", pd.DataFrame(examples)))
    if "formatting" in stats:
        sections.append(
            Section("Formatting", pd.DataFrame(list(stats["formatting"].items()), columns=["key", "value"]))
        )
    write_html_page(path, "Data preparation", sections)
