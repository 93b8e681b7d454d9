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


def statistics(frame: pd.DataFrame) -> dict:
    return dict(zip(frame["statistic"], frame["value"]))


def test_packing_table_leads_with_the_sequences_and_keeps_every_other_stat():
    frame = data_prep.packing_frame(packing_stats())
    values = statistics(frame)
    assert frame["statistic"].iloc[0] == "sequences kept" and values["sequences kept"] == 34
    assert values["loss tokens / total tokens"] == 0.4
    assert values["tokens per bin in training (max_total_sequence_length)"] == 512
    assert values["packing algorithm in training"] == "best_fit_decreasing"
    assert values["seconds.total"] == 0.2 and values["tokenizer"] == "results/demo/tokenizer"  # unlisted keys follow
    assert not [name for name in values if name.startswith(("overlong", "over-long", "dropped", "sequences dropped"))]


def test_packing_table_says_what_was_held_out_for_validation():
    held_out = {"val_set_size": 0.1, "val_set_seed": 42, "rows": 40, "problems": 20, "held_out_rows": 5,
                "held_out_problems": 3, "training_rows": 35, "training_problems": 17}  # fmt: skip
    values = statistics(data_prep.packing_frame({**packing_stats(), "held_out": held_out}))
    assert values["rows held out for validation (training.val_set_size)"] == 5
    assert values["problems held out for validation"] == 3
    assert (values["rows left for training"], values["problems left for training"]) == (35, 17)
    assert values["held_out.val_set_size"] == 0.1 and values["held_out.rows"] == 40  # the others under their names


def test_over_long_table_holds_every_over_long_and_dropped_count():
    stats = packing_stats()
    values = statistics(data_prep.overlong_frame(stats))
    assert values["over-long sequences (more tokens than max_total_sequence_length)"] == 2
    assert values["over-long action"] == "mask"
    assert values["over-long sequences masked (kept, no loss token)"] == 2
    assert values["tokens masked (in masked over-long sequences)"] == 1100
    assert values["tokens truncated (cut off over-long sequences)"] == 0
    assert values["sequences dropped: no loss token"] == 1
    nested = sum(len(stats[group]) for group in data_prep.OVERLONG_GROUPS)
    assert len(values) == nested  # each key of overlong and dropped, once
    whole = len(data_prep.packing_frame(stats)) + len(values)
    assert whole == len(data_prep._flatten(stats)) + 1  # + loss tokens / total tokens: nothing lost, nothing twice


def test_packing_page_shows_how_many_over_long_sequences_were_masked(tmp_path):
    stats = packing_stats()
    stats["overlong"].update(count=3, masked=3)
    write_html_page(tmp_path / "p.html", "Packing data", data_prep.packing_sections(stats, "packed/stats.json"))
    sequences, overlong = html_tables(tmp_path / "p.html")
    shown = dict(overlong[1:])
    assert shown["over-long sequences masked (kept, no loss token)"] == "3"
    assert shown["over-long action"] == "mask"
    page = (tmp_path / "p.html").read_text()
    assert "3 sequence(s) had more than 512 tokens; packing.overlong is mask: kept in training" in page
    assert "Masked: 3." in page
    assert dict(sequences[1:])["sequences kept"] == "34"


def test_packing_page_of_truncated_over_long_sequences_says_so():
    stats = packing_stats()
    stats["overlong"] = {"count": 2, "action": "truncate", "tokens_truncated": 40, "tokens_dropped": 0}
    note = data_prep.overlong_note(stats)
    assert note.startswith("2 sequence(s) had more than 512 tokens; packing.overlong is truncate: cut to")
    assert "Masked" not in note
    values = statistics(data_prep.overlong_frame(stats))
    assert values["tokens truncated (cut off over-long sequences)"] == 40
    stats["overlong"].update(count=0, tokens_truncated=0)
    assert data_prep.overlong_note(stats) == "No sequence had more than 512 tokens (packing.overlong: truncate)."


def test_packing_stats_of_an_older_pack_data_still_show_every_key():
    stats = packing_stats()
    del stats["overlong"]["masked"], stats["overlong"]["tokens_masked"]
    stats.update(bins=12, fill_ratio=0.813802, lower_bound_bins=10)  # pack_data packed before issue 27
    values = statistics(data_prep.packing_frame(stats))
    assert values["bins"] == 12 and values["fill_ratio"] == 0.813802
