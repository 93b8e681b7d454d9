"""The data-preparation funnel, the decontamination audit table and the packing table hold the stats' numbers."""

from __future__ import annotations

import pandas as pd

from sftflow.report import data_prep
from sftflow.report.figures import DPI, WIDTH_INCHES
from sftflow.report.render import write_html_page
from tests.report.conftest import CONTAMINATION, html_tables, packing_stats, png_size, sft_stats, table_dicts


def test_funnel_accounts_for_every_row_read_from_read_to_written():
    funnel = data_prep.funnel_frame(sft_stats()).set_index("stage")
    assert funnel["rows out"].iloc[0] == 100 and funnel["rows out"].iloc[-1] == 35
    assert funnel["dropped"].sum() == 100 - 35  # each dropped row is counted by exactly one step
    assert funnel.loc["invalid rows (skip_invalid_rows)", "dropped"] == 4
    selection = funnel.loc["selection (add_correct / add_incorrect / add_unlabeled)"]
    assert (selection["rows in"], selection["dropped"], selection["rows out"]) == (96, 16, 80)
    assert "incorrect: 0 of 12 kept" in selection["details"]
    assert funnel.loc["trim_solutions", "modified"] == 11
    assert (funnel.loc["deduplicate", "rows in"], funnel.loc["deduplicate", "rows out"]) == (59, 35)
    contaminated = funnel.loc["remove_contaminated", "details"]
    assert "contaminated problems: 3" in contaminated and "results/data/contamination.jsonl" in contaminated
    assert "dropped too long: 9" in funnel.loc["remove_len_outlier_solutions", "details"]


def test_skipped_stage_is_listed_with_its_reason_and_drops_nothing():
    stats = sft_stats()
    stats["funnel"].insert(0, {"stage": "remove_contaminated", "skipped": "no contamination_file set", "rows_in": 0})
    stats["funnel"] = [s for s in stats["funnel"] if "contamination_file" not in s]
    stats["funnel"][1]["rows_in"] = 80
    funnel = data_prep.funnel_frame(stats).set_index("stage")
    row = funnel.loc["remove_contaminated"]
    assert row["details"] == "skipped: no contamination_file set"
    assert (row["rows in"], row["dropped"], row["rows out"]) == (80, 0, 80)


def test_funnel_plot_is_a_png_one_bar_row_per_step(tmp_path):
    funnel = data_prep.funnel_frame(sft_stats())
    path = tmp_path / "funnel.png"
    data_prep.plot_funnel(funnel, path)
    assert png_size(path) == (WIDTH_INCHES * DPI, round(data_prep.funnel_plot_height(len(funnel)) * DPI))
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def file_matches() -> pd.DataFrame:
    """The contaminated rows of CONTAMINATION as read_contamination_matches returns them (line numbers from 1)."""
    keys = ("benchmark", "matched_problem", "how", "overlap")
    rows = [
        {"line": i, "problem": row["problem"], **{k: row[k] for k in keys}}
        for i, row in enumerate(CONTAMINATION, 1)
        if row["contaminated"]
    ]
    return pd.DataFrame(rows)


def stats_with_listed_matches() -> dict:
    """sft.stats.json as prepare_data writes it now: remove_contaminated lists its matches."""
    stats = sft_stats()
    (stage,) = [s for s in stats["funnel"] if s["stage"] == "remove_contaminated"]
    stage["matches"] = file_matches().drop(columns="line").to_dict("records")
    stage["matches_listed"] = 3
    return stats


def test_contamination_table_puts_the_matches_to_check_first():
    frame = data_prep.contamination_frame(file_matches())
    assert frame["training problem"].tolist() == [
        "Compute 9 - 4.",  # "exact", yet the texts differ after normalising: a false positive
        "A train leaves at noon and travels 60 miles",  # fuzzy
        "Compute 3 + 4.",  # a true copy
    ]
    assert frame["same text after normalising"].tolist() == [False, False, True]
    assert frame["benchmark problem it matched"].iloc[1] == "A train leaves at noon and travels 80 miles"
    assert frame["line in file"].tolist() == ["3", "4", "2"]


def test_contamination_page_lists_the_matches_listed_in_the_stats(tmp_path):
    sections = data_prep.contamination_sections(stats_with_listed_matches(), None, None, None)
    write_html_page(tmp_path / "c.html", "Decontamination", sections)
    (table,) = html_tables(tmp_path / "c.html")
    rows = table_dicts(table)
    assert [r["training problem"] for r in rows] == [
        "Compute 9 - 4.",
        "A train leaves at noon and travels 60 miles",
        "Compute 3 + 4.",
    ]
    assert (
        rows[1]["overlap"] == "0.75" and rows[1]["match"] == "5-gram" and rows[0]["same text after normalising"] == "no"
    )
    assert "line in file" not in rows[0]
    note = sections[0].note
    assert "(results/data/contamination.jsonl) matched 3 training problems" in note
    assert "dropped the 5 training rows" in note and "Only" not in note


def test_contamination_page_reads_the_file_when_the_stats_list_no_matches():
    (section,) = data_prep.contamination_sections(sft_stats(), "c.jsonl", len(CONTAMINATION), file_matches())
    assert section.table["line in file"].tolist() == ["3", "4", "2"]
    assert "matched 3 training problems" in section.note and "of 5 distinct training problems checked" in section.note


def test_contamination_page_says_how_many_matches_the_stats_left_out():
    stats = stats_with_listed_matches()
    stats["funnel"][1]["matches"] = stats["funnel"][1]["matches"][:2]  # prepare_data lists at most 1,000
    (section,) = data_prep.contamination_sections(stats, None, None, None)
    assert len(section.table) == 2
    assert "Only 2 of 3 are listed (sft.stats.json lists at most that many)" in section.note


def test_contamination_page_says_when_the_filter_was_off():
    stats = sft_stats()
    stats["funnel"] = [s for s in stats["funnel"] if s["stage"] != "remove_contaminated"]
    (section,) = data_prep.contamination_sections(stats, None, None, None)
    assert section.table is None and "remove_contaminated is off" in section.note


def test_funnel_details_leave_the_match_list_to_its_own_page():
    funnel = data_prep.funnel_frame(stats_with_listed_matches()).set_index("stage")
    details = funnel.loc["remove_contaminated", "details"]
    assert "matches listed: 3" in details and "Compute" not in details


def test_packing_table_leads_with_the_fill_and_keeps_every_other_stat():
    frame = data_prep.packing_frame(packing_stats())
    values = dict(zip(frame["statistic"], frame["value"]))
    assert frame["statistic"].iloc[0] == "fill ratio (tokens / bin capacity)"
    assert values["fill ratio (tokens / bin capacity)"] == 0.813802
    assert values["bins (packed rows)"] == 12 and values["lower bound on bins"] == 10
    assert values["loss tokens / total tokens"] == 0.4
    assert values["over-long sequences"] == 2
    assert values["overlong.tokens_truncated"] == 40 and values["seconds.total"] == 0.2  # unlisted keys follow
