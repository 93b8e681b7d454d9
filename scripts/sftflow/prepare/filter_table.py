"""The row filters of data preparation as one table: a filter's name, which is both its switch in the config
(`filters.<name>` in config/schema.yaml) and its stage in the funnel, -> the factory that builds it. Rows meet the
filters in the table's order.

Adding a row filter: one entry in ROW_FILTERS, its `filters.<name>` key in config/schema.yaml (and
config/README.md), and its tests. The filters in OTHER_STAGES are switched on in the same place but run elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sftflow.errors import SftflowError
from sftflow.io import iter_jsonl
from sftflow.mathtext import normalize_problem
from sftflow.prepare import filters as F
from sftflow.prepare.settings import PrepareConfig

LOG = logging.getLogger("sftflow.prepare")

# How many contamination matches the stats list in full (the count is always complete).
MAX_LISTED_MATCHES = 1000

# Builds a switched-on filter (its stage name, the config): the RowFilter, or, for a filter that has nothing to do,
# the funnel's record of the stage it skipped.
Factory = Callable[[str, PrepareConfig], "F.RowFilter | dict"]


def on_solution(make: Callable[[PrepareConfig, dict], Callable]) -> Factory:
    """The factory of a filter of the solution field (output_key): make(cfg, notes) is its row function (a
    filters.TextFilter when it is a pure function of the text), `notes` the stage's extra counters."""

    def build(name: str, cfg: PrepareConfig) -> F.RowFilter:
        stage = F.RowFilter(name, None, cfg.output_key)
        stage.fn = make(cfg, stage.notes)
        return stage

    return build


def _remove_contaminated(name: str, cfg: PrepareConfig) -> F.RowFilter | dict:
    if not cfg.contamination_file:
        # NeMo-Skills' default is on with no file; say loudly that nothing was checked.
        LOG.warning("filters.remove_contaminated is on but no contamination_file is set: nothing is decontaminated")
        return {"stage": name, "skipped": "no contamination_file set", "rows_in": 0, "dropped": 0}
    contaminated, _rows, matches = load_contaminated(cfg.contamination_file, cfg.input_key)
    stage = F.RowFilter(name, F.remove_contaminated(cfg.input_key, contaminated), cfg.input_key)
    # The matches themselves, so that a user can audit what decontamination removed (and why).
    stage.info.update(
        contamination_file=str(cfg.contamination_file),
        contaminated_problems=len(contaminated),
        matches=matches[:MAX_LISTED_MATCHES],
        matches_listed=min(len(matches), MAX_LISTED_MATCHES),
    )
    return stage


def _majority_filter(cfg: PrepareConfig, notes: dict) -> Callable:
    settings = cfg.majority_filter
    return F.majority_filter(settings["min_majority_votes"], settings["min_majority_percentage"], notes)


ROW_FILTERS: dict[str, Factory] = {
    "drop_multi_boxed": on_solution(lambda cfg, notes: F.drop_multi_boxed(cfg.output_key)),
    "remove_contaminated": _remove_contaminated,
    "remove_code_errors": on_solution(lambda cfg, notes: F.drop_if_contains(cfg.output_key, F.CODE_ERROR_MARKERS)),
    "remove_matplotlib": on_solution(lambda cfg, notes: F.drop_if_contains(cfg.output_key, F.MATPLOTLIB_MARKERS)),
    "remove_no_code": on_solution(
        lambda cfg, notes: F.drop_unless_contains_all(cfg.output_key, (cfg.code_begin, cfg.code_end))
    ),
    "remove_no_think_tags": on_solution(lambda cfg, notes: F.drop_unless_contains_all(cfg.output_key, (F.THINK_END,))),
    "remove_verification_code": on_solution(
        lambda cfg, notes: F.drop_if_contains(cfg.output_key, F.VERIFICATION_MARKERS)
    ),
    "majority_filter": on_solution(_majority_filter),
    "trim_prefix": on_solution(lambda cfg, notes: F.trim_prefix(cfg.output_key, cfg.trim_prefix_text)),
    "trim_solutions": on_solution(lambda cfg, notes: F.trim_solutions(cfg.output_key, notes)),
    "drop_incorrect_arithmetic": on_solution(
        lambda cfg, notes: F.drop_incorrect_arithmetic(cfg.output_key, cfg.arithmetic_tolerance)
    ),
    "split_arithmetic": on_solution(lambda cfg, notes: F.split_arithmetic(cfg.output_key)),
}

# Switched on under `filters:` too, but not per row: the token-length filters run on batches of rows
# (sftflow.prepare.rows.LengthStage), code_text_filter on each problem's rows once they are grouped (ordering).
OTHER_STAGES = ("remove_len_outlier_problems", "remove_len_outlier_solutions", "code_text_filter")


def build_row_filters(cfg: PrepareConfig) -> tuple[list[F.RowFilter], list[dict]]:
    """The switched-on row filters in the table's order, and the funnel records of those with nothing to do."""
    filters, skipped = [], []
    for name, build in ROW_FILTERS.items():
        if cfg.filters[name]:
            stage = build(name, cfg)
            (skipped if isinstance(stage, dict) else filters).append(stage)
    return filters, skipped


def load_contaminated(path: str, key: str) -> tuple[set[str], int, list[dict]]:
    """Normalised problems marked contaminated in a NeMo-Skills style contamination file, the row count,
    and the contaminated rows themselves (with benchmark / matched_problem / how when our rule wrote them)."""
    contaminated = set()
    matches = []
    rows = 0
    for line, row in iter_jsonl(path):
        rows += 1
        if key not in row or not isinstance(row[key], str):
            raise SftflowError(f"{path}:{line}: contamination row has no string field '{key}'")
        if row.get("contaminated", True):
            contaminated.add(normalize_problem(row[key]))
            matches.append(
                {
                    "problem": row[key],
                    **{k: row[k] for k in ("benchmark", "matched_problem", "how", "overlap") if k in row},
                }
            )
    return contaminated, rows, matches
